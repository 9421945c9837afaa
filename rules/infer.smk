# TESSERA inference on a tile's stack (GPU when present, else CPU threads): one job per tile, or
# one per patch (config infer.per). Either way each patch is written as work/.../patches/r*_c*.npz.


if CFG["infer"]["per"] == "patch":

    rule infer:
        input:
            stack=f"{WORK}/{{tile}}/stack.json",
            roi_mask=f"{WORK}/{{tile}}/roi.tif",
            checkpoint=checkpoint_path(),
        output:
            f"{WORK}/{{tile}}/patches/{{patch}}.npz",
        params:
            patches=patch_args,
            out_dir=lambda wildcards, output: os.path.dirname(output[0]),
            **INFER_PARAMS,
        threads: 4
        resources:
            mem_mb=grows_with_attempt(INFER_MEM_MB),
            runtime=grows_with_attempt(60),
            gpu=INFER_GPUS,
        log:
            "logs/infer/{tile}/{patch}.log",
        benchmark:
            "logs/benchmarks/infer/{tile}/{patch}.tsv"
        conda:
            ENV
        shell:
            INFER_COMMAND

else:

    rule infer:
        input:
            stack=f"{WORK}/{{tile}}/stack.json",
            roi_mask=f"{WORK}/{{tile}}/roi.tif",
            checkpoint=checkpoint_path(),
        output:
            directory(f"{WORK}/{{tile}}/patches"),
        params:
            patches=patch_args,
            out_dir=lambda wildcards, output: output[0],
            **INFER_PARAMS,
        threads: 4
        resources:
            mem_mb=grows_with_attempt(INFER_MEM_MB),
            runtime=grows_with_attempt(60),
            gpu=INFER_GPUS,
        log:
            "logs/infer/{tile}.log",
        benchmark:
            "logs/benchmarks/infer/{tile}.tsv"
        conda:
            ENV
        shell:
            INFER_COMMAND
