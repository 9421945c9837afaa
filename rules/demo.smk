# The embedded demo: synthetic scenes behind a local STAC API, and seeded random weights.


rule demo_catalog:
    output:
        DEMO_CATALOG,
    params:
        roi=CFG["roi"],
        year=YEAR,
        revisits=f"--s2-revisit-days {CFG['demo']['s2_revisit_days']} --s1-revisit-days {CFG['demo']['s1_revisit_days']}",
    log:
        f"logs/demo_catalog/{YEAR}.log",
    benchmark:
        f"logs/benchmarks/demo_catalog/{YEAR}.tsv"
    conda:
        ENV
    shell:
        "tessera demo-catalog --roi '{params.roi}' --year {params.year} {params.revisits} --out {output} 2> {log}"


rule demo_checkpoint:
    output:
        f"{CFG['work_dir']}/demo/checkpoint-{{family}}.pt",
    log:
        "logs/demo_checkpoint/{family}.log",
    benchmark:
        "logs/benchmarks/demo_checkpoint/{family}.tsv"
    conda:
        ENV
    shell:
        "tessera demo-checkpoint --family {wildcards.family} --out {output} 2> {log}"
