# Per tile, one job: the ROI mask, the Sentinel-2 and Sentinel-1 fetch into Zarr stacks, and the
# stack index. One job rather than four keeps the DAG small (Snakemake spends a few ms per job on
# every dry-run and every cluster job's start: 1,000 tiles stay under 10 s, benchmarks/dag.py); the
# price is that a tile whose S1 fetch fails fetches its S2 again on the rerun.


rule fetch:
    input:
        unpack(fetch_inputs),
    output:
        roi_mask=f"{WORK}/{{tile}}/roi.tif",
        s2=directory(f"{WORK}/{{tile}}/s2.zarr"),
        s1=directory(f"{WORK}/{{tile}}/s1.zarr"),
        index=f"{WORK}/{{tile}}/stack.json",
        observations=f"{OUT}/observations/{YEAR}/{{tile}}_{YEAR}.tif",
    resources:
        mem_mb=grows_with_attempt(2000),
        runtime=grows_with_attempt(240),
    params:
        roi=CFG["roi"],
        window=tile_window,
        source=CFG["source"],
        s2_options=fetch_options("s2"),
        s1_options=fetch_options("s1"),
        year=YEAR,
    log:
        "logs/fetch/{tile}.log",
    benchmark:
        "logs/benchmarks/fetch/{tile}.tsv"
    conda:
        ENV
    shell:
        "(tessera roi-mask --roi '{params.roi}' --tile {wildcards.tile} --out {output.roi_mask}"
        " && tessera fetch s2 --tile {wildcards.tile} --year {params.year} --window {params.window}"
        " --roi-mask {output.roi_mask} --source {params.source} {params.s2_options} --out {output.s2}"
        " && tessera fetch s1 --tile {wildcards.tile} --year {params.year} --window {params.window}"
        " --roi-mask {output.roi_mask} --source {params.source} {params.s1_options} --out {output.s1}"
        " && tessera stack --s2 {output.s2} --s1 {output.s1} --out {output.index}"
        " --observations {output.observations}) 2> {log}"
