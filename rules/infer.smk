# TESSERA inference on a tile's stack (tessera infer -> tessera.infer.infer_patches; GPU when
# present, else CPU threads): one job per tile, or one per patch (config infer.per). Either way each
# patch is written as work/.../patches/r*_c*.npz.

# Memory: the measured peak for the patch size, the family's numbers per pixel and the checkpoint's
# size (tessera.infer.memory_mb), times the attempt.
INFER_MEM_MB = infer_memory_mb(CFG["patch_size"] ** 2, family_entry(FAMILY).embedding_dims,
                               checkpoint_bytes(CFG["model"]["checkpoint"], CFG["model"]["cache_dir"]))


rule infer:
    input:
        index=str(WORK_TILE.stack_index),
        roi_mask=str(WORK_TILE.roi_mask),
        checkpoint=CHECKPOINT,
    output:
        str(WORK_TILE.patch("{patch}")) if PER_PATCH else directory(str(WORK_TILE.patches)),
    params:
        patches="--patch {patch}" if PER_PATCH else "",
        family=FAMILY,
        options=InferOptions.from_config(CFG).cli_args(),
    threads: 4
    resources:
        mem_mb=grows_with_attempt(INFER_MEM_MB),
        runtime=grows_with_attempt(60),
        gpu=0 if CFG["device"] == "cpu" else 1,
    log:
        "logs/infer/{year}/{tile}/{patch}.log" if PER_PATCH else "logs/infer/{year}/{tile}.log",
    benchmark:
        "logs/benchmarks/infer/{year}/{tile}/{patch}.tsv" if PER_PATCH else "logs/benchmarks/infer/{year}/{tile}.tsv"
    conda:
        ENV
    shell:
        f"tessera infer {TILE_ARGS} {ROI_ARGS} {{params.patches}} --checkpoint {{input.checkpoint}}"
        " --family {params.family} {params.options} --threads {threads} 2> {log}"
