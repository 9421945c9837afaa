# What people look at and catalogue: PCA quicklooks, per-zone mosaics, STAC, and the run report.
# (Observation counts come from the fetch rule, tile COGs from the assemble rule.)


rule quicklook:
    input:
        manifest=MANIFEST,
        embeddings=expand(f"{EMBED_DIR}/{{tile}}/{{tile}}.npy", tile=TILES),
        scales=expand(f"{EMBED_DIR}/{{tile}}/{{tile}}_scales.npy", tile=TILES),
        landmasks=expand(f"{LANDMASK_DIR}/{{tile}}.tiff", tile=TILES),
    output:
        # One job for every tile: the PCA basis is fitted on all of them, so any tile that changes
        # changes every quicklook anyway, and a job per tile would only grow the DAG.
        # A directory, not thousands of files: Snakemake compares each requested file with every
        # output of a candidate rule, which made a 1,000-tile dry-run seconds slower.
        directory(QUICKLOOKS),
    params:
        output_dir=output_dir_of_manifest,
        year=YEAR,
    threads: 2
    resources:
        mem_mb=grows_with_attempt(4000),
        runtime=grows_with_attempt(max(20, len(TILES) // 20)),
    log:
        "logs/quicklook.log",
    benchmark:
        "logs/benchmarks/quicklook.tsv"
    conda:
        ENV
    shell:
        "tessera quicklook --output-dir {params.output_dir} --year {params.year} --threads {threads} 2> {log}"


rule mosaic:
    input:
        manifest=MANIFEST,
        cogs=expand(f"{OUT}/cog/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES),
        quicklooks=QUICKLOOKS,
    output:
        expand(
            f"{OUT}/mosaic/{YEAR}/{{layer}}_{YEAR}_epsg{{epsg}}.{{ext}}",
            layer=["tessera", "quicklook"],
            epsg=ZONES,
            ext=["vrt", "tif"] if CFG["export"]["mosaic_cog"] else ["vrt"],
        ),
    params:
        output_dir=output_dir_of_manifest,
        year=YEAR,
        cog="--cog" if CFG["export"]["mosaic_cog"] else "",
    log:
        "logs/mosaic.log",
    benchmark:
        "logs/benchmarks/mosaic.tsv"
    conda:
        ENV
    shell:
        "tessera mosaic --output-dir {params.output_dir} --year {params.year} {params.cog} 2> {log}"


rule stac:
    input:
        stacks=expand(f"{WORK}/{{tile}}/stack.json", tile=TILES),
        manifest=MANIFEST,
        checkpoint=checkpoint_path(),
        cogs=expand(f"{OUT}/cog/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES) if CFG["export"]["cog"] else [],
        # Items link and checksum the quicklooks: without them as an input the catalogue could be
        # written while the quicklooks are being remade (Snakemake removes a job's outputs first).
        quicklooks=QUICKLOOKS,
    output:
        f"{OUT}/stac/collection.json",
    params:
        output_dir=output_dir_of_manifest,
        year=YEAR,
        family=FAMILY,
        variant=CFG["export"]["variant"],
        source=CFG["source"],
    log:
        "logs/stac.log",
    benchmark:
        "logs/benchmarks/stac.tsv"
    conda:
        ENV
    shell:
        "tessera stac --output-dir {params.output_dir} --year {params.year} --family {params.family}"
        " --variant {params.variant} --source {params.source} --checkpoint {input.checkpoint}"
        " {input.stacks} 2> {log}"


rule report:
    input:
        stacks=expand(f"{WORK}/{{tile}}/stack.json", tile=TILES),
        quicklooks=QUICKLOOKS,
        manifest=MANIFEST,
    output:
        f"{OUT}/report_{YEAR}.html",
    params:
        output_dir=output_dir_of_manifest,
        year=YEAR,
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    conda:
        ENV
    shell:
        "tessera report --output-dir {params.output_dir} --year {params.year} --out {output}"
        " --benchmarks logs/benchmarks {input.stacks} 2> {log}"
