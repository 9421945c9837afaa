# TESSERA inference on a tile's stack (tessera infer -> tessera.infer.infer_patches; GPU when
# present, else CPU threads): one job per tile, or one per patch (config infer.per). Either way each
# patch is written as work/.../patches/r*_c*.npz.
import math

# Memory from measured peaks (benchmarks/fulltile.py, a whole tile with a year of demo scenes: 60 S2
# dates and 61 S1 passes; v2 at its published small size on the CPU; README "One tile, stage by
# stage"): 3,370 MiB with 512 px patches, 2,644 MiB with 256 px ones. That is 2,402 MiB whatever the
# patch (Python, torch, the model, a batch of 4,096 pixels of up to 64 steps) plus 3.8 KiB per
# pixel of the patch (its stacks, read and padded, and its embeddings), with 10 % to spare: 3,800 MB
# for 512 px patches. The per-pixel part grows with a tile's dates (twice the demo's is what the
# first retry asks for); on a GPU node the host also holds CUDA's libraries, not measured here.
INFER_MEM_MB = 100 * math.ceil(1.1 * (2402 + 0.003693 * CFG["patch_size"] ** 2) / 100)


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
