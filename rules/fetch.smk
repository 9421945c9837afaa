# Per tile: the ROI mask, Sentinel-2 and Sentinel-1 fetch into Zarr stacks, and the stack index.


rule roi_mask:
    input:
        roi_input(),
    output:
        f"{WORK}/{{tile}}/roi.tif",
    resources:
        mem_mb=grows_with_attempt(1000),
        runtime=grows_with_attempt(10),
    params:
        roi=CFG["roi"],
    log:
        "logs/roi_mask/{tile}.log",
    benchmark:
        "logs/benchmarks/roi_mask/{tile}.tsv"
    conda:
        ENV
    shell:
        "tessera roi-mask --roi '{params.roi}' --tile {wildcards.tile} --out {output} 2> {log}"


for sensor in ("s2", "s1"):

    rule:
        name:
            f"fetch_{sensor}"
        input:
            unpack(fetch_inputs),
        output:
            directory(f"{WORK}/{{tile}}/{sensor}.zarr"),
        resources:
            mem_mb=grows_with_attempt(2000),
            runtime=grows_with_attempt(120),
        params:
            window=tile_window,
            source=CFG["source"],
            options=fetch_options(sensor),
            sensor=sensor,
            year=YEAR,
        log:
            f"logs/fetch_{sensor}/{{tile}}.log",
        benchmark:
            f"logs/benchmarks/fetch_{sensor}/{{tile}}.tsv"
        conda:
            ENV
        shell:
            "tessera fetch {params.sensor} --tile {wildcards.tile} --year {params.year} --window {params.window}"
            " --roi-mask {input.roi_mask} --source {params.source} {params.options} --out {output} 2> {log}"


rule stack:
    input:
        s2=f"{WORK}/{{tile}}/s2.zarr",
        s1=f"{WORK}/{{tile}}/s1.zarr",
    output:
        index=f"{WORK}/{{tile}}/stack.json",
        observations=f"{OUT}/observations/{YEAR}/{{tile}}_{YEAR}.tif",
    resources:
        mem_mb=grows_with_attempt(1000),
        runtime=grows_with_attempt(30),
    log:
        "logs/stack/{tile}.log",
    benchmark:
        "logs/benchmarks/stack/{tile}.tsv"
    conda:
        ENV
    shell:
        "tessera stack --s2 {input.s2} --s1 {input.s1} --out {output.index}"
        " --observations {output.observations} 2> {log}"
