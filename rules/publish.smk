# Once per run (tessera publish -> tessera.publish.publish), for every year of it: geotessera's
# sidecar and manifests, one PCA basis and every tile-year's quicklook, mosaics per zone and year,
# the STAC catalogue, the Zarr store in geotessera's layout and the report.
# One job: the PCA basis depends on every tile, and everything after it on the quicklooks, so any
# tile that changes remakes them all anyway, and fewer jobs keep the DAG small. Its folders are
# directory outputs: Snakemake compares each requested file with every output of a candidate rule,
# so thousands of explicit files made a 1,000-tile dry-run seconds slower.

MOSAICS = CFG["export"]["cog"]
# What the run is for (rule all asks for these): the per-tile outputs follow through the inputs.
PUBLISHED = dict(
    metadata=str(RESULTS.metadata),
    manifest=str(RESULTS.manifest),
    registry=str(RESULTS.registry),
    landmasks=str(RESULTS.landmasks_manifest),
    quicklooks=[str(RESULTS.quicklooks(year)) for year in YEARS],
    mosaics=expand(
        str(RESULTS.mosaic("{layer}", "{year}", "{epsg}", "{ext}")),
        layer=["tessera", "quicklook"],
        year=YEARS,
        epsg=ZONES,
        ext=["vrt", "tif"] if CFG["export"]["mosaic_cog"] else ["vrt"],
    )
    if MOSAICS
    else [],
    stac=str(RESULTS.stac_collection),
    zarr=str(RESULTS.zarr_store),
    run_report=str(RESULTS.report),
)


rule publish:
    input:
        # One file per tile-year: its assemble job's other outputs (scales, COG) and what that job
        # needs (the fetch's stack index and ROI mask) come with it.
        embeddings=expand_tiles(EMBEDDING),
        checkpoint=CHECKPOINT,
    output:
        **{
            **PUBLISHED,
            # In `snakemake --report`: the quicklook PNGs (directory outputs: one pattern per year, not
            # a file each) and our HTML report, with captions from workflow/report/.
            "quicklooks": [report(directory(folder), patterns=[f"{{name}}_{year}.png"],
                                  caption="../workflow/report/quicklooks.rst", category="Quicklooks")
                           for folder, year in zip(PUBLISHED["quicklooks"], YEARS)],
            "zarr": directory(PUBLISHED["zarr"]),
            "run_report": report(PUBLISHED["run_report"], caption="../workflow/report/report.rst",
                                 category="Report"),
        },
    params:
        options=" ".join(
            [f"--family {FAMILY} --variant {CFG['export']['variant']} --source {CFG['source']}"]
            + (["--mosaics"] if MOSAICS else [])
            + (["--mosaic-cog"] if CFG["export"]["mosaic_cog"] else [])
            + [InferOptions.from_config(CFG).cli_args(only=InferOptions.PROVENANCE)]
        ),
    threads: 2
    resources:
        mem_mb=grows_with_attempt(4000),
        runtime=grows_with_attempt(max(20, len(TILES) // 20)),
    log:
        "logs/publish.log",
    benchmark:
        "logs/benchmarks/publish.tsv"
    conda:
        ENV
    shell:
        f"tessera publish --output-dir {shlex.quote(OUTPUT_DIR)} --work-dir {shlex.quote(WORK_DIR)}"
        " {params.options} --threads {threads} --checkpoint {input.checkpoint}"
        " --benchmarks logs/benchmarks {input.embeddings} 2> {log}"
