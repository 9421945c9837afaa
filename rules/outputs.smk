# What people look at and catalogue: PCA quicklooks, per-zone mosaics, STAC, and the run report.
# (Observation counts come from the stack rule, tile COGs from the assemble rule.)


rule quicklook_pca:
    input:
        manifest=rules.catalog.output.manifest,
        embeddings=expand(f"{EMBED_DIR}/{{tile}}/{{tile}}.npy", tile=TILES),
        scales=expand(f"{EMBED_DIR}/{{tile}}/{{tile}}_scales.npy", tile=TILES),
    output:
        f"{OUT}/quicklook/{YEAR}/pca.json",
    params:
        output_dir=output_dir_of_manifest,
        year=YEAR,
    log:
        "logs/quicklook_pca.log",
    benchmark:
        "logs/benchmarks/quicklook_pca.tsv"
    conda:
        ENV
    shell:
        "tessera quicklook-pca --output-dir {params.output_dir} --year {params.year} --out {output} 2> {log}"


rule quicklook:
    input:
        pca=rules.quicklook_pca.output[0],
        manifest=rules.catalog.output.manifest,
        embedding=rules.assemble.output.embedding,
        scales=rules.assemble.output.scales,
        landmask=rules.assemble.output.landmask,
    output:
        png=f"{OUT}/quicklook/{YEAR}/{{tile}}_{YEAR}.png",
        cog=f"{OUT}/quicklook/{YEAR}/{{tile}}_{YEAR}.tif",
    params:
        output_dir=output_dir_of_manifest,
        year=YEAR,
    resources:
        mem_mb=grows_with_attempt(2000),
        runtime=grows_with_attempt(20),
    log:
        "logs/quicklook/{tile}.log",
    benchmark:
        "logs/benchmarks/quicklook/{tile}.tsv"
    conda:
        ENV
    shell:
        "tessera quicklook --output-dir {params.output_dir} --year {params.year} --tile {wildcards.tile}"
        " --pca {input.pca} 2> {log}"


rule mosaic:
    input:
        manifest=rules.catalog.output.manifest,
        cogs=expand(f"{OUT}/cog/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES),
        quicklooks=expand(f"{OUT}/quicklook/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES),
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
        manifest=rules.catalog.output.manifest,
        checkpoint=checkpoint_path(),
        cogs=expand(f"{OUT}/cog/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES) if CFG["export"]["cog"] else [],
        # Items link and checksum the quicklooks: without them as inputs the catalogue could be
        # written while a quicklook is being remade (Snakemake removes a job's outputs first).
        quicklooks=expand(f"{OUT}/quicklook/{YEAR}/{{tile}}_{YEAR}.{{kind}}", tile=TILES, kind=("png", "tif")),
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
        quicklooks=expand(f"{OUT}/quicklook/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES),
        manifest=rules.catalog.output.manifest,
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
