# Per tile-year (tessera assemble -> tessera.assemble.assemble_tile): int8 + scales and SHA256 in
# geotessera's layout, and the tile's float32 COG. Its memory: assemble_mem_mb in common.smk.


rule assemble:
    input:
        patches=patch_embeddings if PER_PATCH else str(WORK_TILE.patches),
        roi_mask=str(WORK_TILE.roi_mask),
        checkpoint=CHECKPOINT,
    output:
        embedding=EMBEDDING,
        scales=SCALES,
        checksums=str(RESULTS.checksums("{tile}", "{year}")),
        cog=[COG] if CFG["export"]["cog"] else [],
        float32=[str(RESULTS.float32("{tile}", "{year}"))] if CFG["export"]["float32"] else [],
    params:
        options=" ".join(
            [f"--family {FAMILY} --source {CFG['source']}"]
            + (["--cog"] if CFG["export"]["cog"] else [])
            + (["--float32"] if CFG["export"]["float32"] else [])
            + ([f"--dims {CFG['export']['dims']}"] if CFG["export"]["dims"] else [])
        ),
    threads: ASSEMBLE_THREADS
    resources:
        mem_mb=assemble_mem_mb,
        runtime=grows_with_attempt(30),
    log:
        "logs/assemble/{year}/{tile}.log",
    benchmark:
        "logs/benchmarks/assemble/{year}/{tile}.tsv"
    conda:
        ENV
    shell:
        f"tessera assemble {TILE_ARGS} --output-dir {shlex.quote(OUTPUT_DIR)}"
        " {params.options} --threads {threads} --checkpoint {input.checkpoint} {input.patches} 2> {log}"
