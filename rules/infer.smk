# Per patch: TESSERA inference on the tile's stack (GPU when present, else CPU threads).


rule infer:
    input:
        stack=f"{WORK}/{{tile}}/stack.json",
        roi_mask=f"{WORK}/{{tile}}/roi.tif",
        checkpoint=checkpoint_path(),
    output:
        f"{WORK}/{{tile}}/patches/{{patch}}.npy",
    params:
        patch=patch_window,
        family=FAMILY,
        trust="--trust-checkpoint" if CFG["model"]["trust_checkpoint"] else "",
        device=CFG["device"],
        seed=CFG["infer"]["seed"],
        batch_pixels=CFG["infer"]["batch_pixels"],
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
        "tessera infer --stack {input.stack} --patch {params.patch} --roi-mask {input.roi_mask}"
        " --checkpoint {input.checkpoint} --family {params.family} {params.trust} --device {params.device}"
        " --seed {params.seed} --batch-pixels {params.batch_pixels} --threads {threads} --out {output} 2> {log}"
