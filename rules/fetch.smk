# Per tile, one job (tessera fetch -> tessera.fetch.fetch_tile): the ROI mask, the Sentinel-2 and
# Sentinel-1 stacks, the stack index and the observation counts. One job rather than four keeps the
# DAG small (Snakemake spends a few ms per job on every dry-run and every cluster job's start:
# benchmarks/dag.py); the price is that a tile whose S1 fetch fails fetches its S2 again.

# Memory from the highest measured peak of a whole tile's fetch (benchmarks/fulltile.py, a year of
# demo scenes, README "One tile, stage by stage"): 669 MiB (a later run: 449 MiB), for the
# 717 x 1118 px work window of a 0.1° tile at 52°N. A fetch holds one date's window-sized arrays at
# a time; a window at the equator has up to 1.53x those pixels (the whole 1113 x 1105 px tile); the
# demo's STAC server adds ~100 MiB to the job: 669 x 1.53 + 100 = 1,124 MiB = 1,179 MB, rounded up.
# Each retry asks for this once more.
FETCH_MEM_MB = 1200


rule fetch:
    input:
        roi_input(),
        DEMO_CATALOG if CFG["source"] == "demo" else [],
    output:
        roi_mask=str(WORK_TILE.roi_mask),
        s2=directory(str(WORK_TILE.s2)),
        s1=directory(str(WORK_TILE.s1)),
        index=str(WORK_TILE.stack_index),
        observations=report(OBSERVATIONS, caption="../workflow/report/observations.rst", category="Observation counts"),
    resources:
        mem_mb=grows_with_attempt(FETCH_MEM_MB),
        runtime=grows_with_attempt(240),
    params:
        source=f"--source {CFG['source']}"
        + (f" --source-options {shlex.quote(json.dumps(CFG['stac']))}" if CFG["source"] == "stac" else ""),
        options=FetchOptions.from_config(CFG).cli_args(),
    log:
        "logs/fetch/{year}/{tile}.log",
    benchmark:
        "logs/benchmarks/fetch/{year}/{tile}.tsv"
    conda:
        ENV
    shell:
        f"tessera fetch {TILE_ARGS} --output-dir {shlex.quote(OUTPUT_DIR)} --roi {shlex.quote(CFG['roi'])}"
        " {params.source} {params.options} 2> {log}"
