# TESSERA inference on a tile's stack (tessera infer -> tessera.infer.infer_patches; GPU when
# present, else CPU threads): one job per tile, or one per patch (config infer.per). Either way each
# patch is written as work/.../patches/r*_c*.npz.

# Inference holds a patch's whole time series (about 80 steps x P x P x 12 channels, as uint16 and
# as float32 model inputs): about 8 GB for 512 px patches, less for smaller ones.
INFER_MEM_MB = max(2000, int(8000 * (CFG["patch_size"] / 512) ** 2))


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
