# Per tile: int8 + scales in geotessera's layout, landmask, float32 COG; the manifests and sidecar.


rule assemble:
    input:
        patches=tile_patches,
        roi_mask=f"{WORK}/{{tile}}/roi.tif",
        checkpoint=checkpoint_path(),
    output:
        embedding=f"{EMBED_DIR}/{{tile}}/{{tile}}.npy",
        scales=f"{EMBED_DIR}/{{tile}}/{{tile}}_scales.npy",
        checksums=f"{EMBED_DIR}/{{tile}}/SHA256",
        landmask=f"{LANDMASK_DIR}/{{tile}}.tiff",
        cog=[f"{OUT}/cog/{YEAR}/{{tile}}_{YEAR}.tif"] if CFG["export"]["cog"] else [],
        float32=[f"{EMBED_DIR}/{{tile}}/{{tile}}_float32.npy"] if CFG["export"]["float32"] else [],
    params:
        family=FAMILY,
        cog=lambda wildcards, output: f"--cog {output.cog[0]}" if output.cog else "",
        float32=lambda wildcards, output: f"--float32 {output.float32[0]}" if output.float32 else "",
        dims=f"--dims {CFG['export']['dims']}" if CFG["export"]["dims"] else "",
        tags=f"--tag TESSERA_MODEL={FAMILY} --tag TESSERA_SOURCE={CFG['source']} --tag TESSERA_YEAR={YEAR}",
    resources:
        mem_mb=grows_with_attempt(2000),
        runtime=grows_with_attempt(30),
    log:
        "logs/assemble/{tile}.log",
    benchmark:
        "logs/benchmarks/assemble/{tile}.tsv"
    conda:
        ENV
    shell:
        "tessera assemble --tile {wildcards.tile} --family {params.family} --roi-mask {input.roi_mask}"
        " --embedding {output.embedding} --scales {output.scales} --checksums {output.checksums}"
        " --landmask {output.landmask} {params.cog} {params.float32} {params.dims}"
        " --checkpoint {input.checkpoint} {params.tags}"
        " {input.patches} 2> {log}"


rule catalog:
    input:
        checkpoint=checkpoint_path(),
        embeddings=expand(f"{EMBED_DIR}/{{tile}}/{{tile}}.npy", tile=TILES),
        scales=expand(f"{EMBED_DIR}/{{tile}}/{{tile}}_scales.npy", tile=TILES),
        landmasks=expand(f"{LANDMASK_DIR}/{{tile}}.tiff", tile=TILES),
    output:
        metadata=f"{OUT}/tessera_metadata.json",
        manifest=MANIFEST,
        registry=f"{OUT}/registry.parquet",
        landmasks=f"{OUT}/landmasks.parquet",
    params:
        family=FAMILY,
        variant=CFG["export"]["variant"],
        source=CFG["source"],
        year=YEAR,
        output_dir=lambda wildcards, output: os.path.dirname(output.metadata),
    log:
        "logs/catalog.log",
    benchmark:
        "logs/benchmarks/catalog.tsv"
    conda:
        ENV
    shell:
        "tessera catalog --output-dir {params.output_dir} --family {params.family} --variant {params.variant}"
        " --checkpoint {input.checkpoint} --source {params.source} --year {params.year} {input.embeddings} 2> {log}"
