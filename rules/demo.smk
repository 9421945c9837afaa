# The embedded demo: synthetic scenes behind a local STAC API, and seeded random weights.


rule demo_catalog:
    output:
        DEMO_CATALOG,
    params:
        roi=shlex.quote(CFG["roi"]),
        revisits=f"--s2-revisit-days {CFG['demo']['s2_revisit_days']} --s1-revisit-days {CFG['demo']['s1_revisit_days']}",
    log:
        "logs/demo_catalog/{year}.log",
    benchmark:
        "logs/benchmarks/demo_catalog/{year}.tsv"
    conda:
        ENV
    shell:
        f"tessera demo catalog --roi {{params.roi}} --year {{wildcards.year}} {{params.revisits}} --work-dir {shlex.quote(WORK_DIR)} 2> {{log}}"


rule demo_checkpoint:
    output:
        str(layout.demo_checkpoint(WORK_DIR, FAMILY)),
    log:
        f"logs/demo_checkpoint/{FAMILY}.log",
    benchmark:
        f"logs/benchmarks/demo_checkpoint/{FAMILY}.tsv"
    conda:
        ENV
    shell:
        f"tessera demo checkpoint --family {FAMILY} --work-dir {shlex.quote(WORK_DIR)} 2> {{log}}"
