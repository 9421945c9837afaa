# Once per run (tessera publish -> tessera.publish.publish): geotessera's sidecar and manifests,
# one PCA basis and every tile's quicklook, per-zone mosaics, the STAC catalogue, the Zarr store in
# geotessera's layout and the report.
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
    quicklooks=str(RESULTS.quicklooks(YEAR)),
    mosaics=expand(
        str(RESULTS.mosaic("{layer}", YEAR, "{epsg}", "{ext}")),
        layer=["tessera", "quicklook"],
        epsg=ZONES,
        ext=["vrt", "tif"] if CFG["export"]["mosaic_cog"] else ["vrt"],
    )
    if MOSAICS
    else [],
    stac=str(RESULTS.stac_collection),
    zarr=str(RESULTS.zarr_store),
    run_report=str(RESULTS.report(YEAR)),
)


rule publish:
    input:
        stacks=expand_tiles(str(WORK_TILE.stack_index)),
        embeddings=expand_tiles(EMBEDDING),
        scales=expand_tiles(SCALES),
        landmasks=expand_tiles(LANDMASK),
        cogs=expand_tiles(COG) if CFG["export"]["cog"] else [],
        checkpoint=CHECKPOINT,
    output:
        **{
            **PUBLISHED,
            # In `snakemake --report`: the quicklook PNGs (a directory output: one pattern, not a file
            # each) and our HTML report, with captions from workflow/report/.
            "quicklooks": report(directory(PUBLISHED["quicklooks"]), patterns=[f"{{name}}_{YEAR}.png"],
                                 caption="../workflow/report/quicklooks.rst", category="Quicklooks"),
            "zarr": directory(PUBLISHED["zarr"]),
            "run_report": report(PUBLISHED["run_report"], caption="../workflow/report/report.rst",
                                 category="Report"),
        },
    params:
        options=" ".join(
            [f"--year {YEAR} --family {FAMILY} --variant {CFG['export']['variant']} --source {CFG['source']}"]
            + (["--mosaics"] if MOSAICS else [])
            + (["--mosaic-cog"] if CFG["export"]["mosaic_cog"] else [])
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
        f"tessera publish --output-dir {shlex.quote(OUTPUT_DIR)}"
        " {params.options} --threads {threads} --checkpoint {input.checkpoint}"
        " --benchmarks logs/benchmarks {input.stacks} 2> {log}"
