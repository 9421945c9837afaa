# tessera-workflow: a region of interest and a year in, TESSERA embeddings out.
#
#   snakemake --configfile config/demo.yaml --cores 2      # the offline demo
#   snakemake -n --configfile my.yaml                       # preview every job, fetch nothing
#
# All logic lives in the `tessera` Python package; rules only call its CLI. The tile and patch
# lists are computed here from the ROI (geometry only: cheap and offline), so a dry-run lists every
# job and every cluster job can re-read this file quickly.
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.20")


configfile: f"{workflow.basedir}/config/config.yaml"


# `snakemake --report report.zip` after a run: quicklooks, observation counts and our HTML report,
# captioned from workflow/report/ (marked with report() in rules/fetch.smk and rules/publish.smk).
report: "workflow/report/workflow.rst"


include: "rules/common.smk"


# With `--sdm apptainer`, every job runs in this image (one with tessera-workflow installed; README,
# "Containers"); without the flag Snakemake ignores it.
if CFG["container"]:

    container: CFG["container"]


include: "rules/demo.smk"
include: "rules/download.smk"
include: "rules/fetch.smk"
include: "rules/infer.smk"
include: "rules/assemble.smk"
include: "rules/publish.smk"


rule all:
    input:
        # Every tile-year's embedding (asked for, so that a lost or removed one is made again even when
        # the run-level products are present), then the run-level products. Sorted, the embeddings
        # come first: `--batch all=k/N` makes parts of whole tile-years, and the last part publishes.
        embeddings=expand_tiles(EMBEDDING),
        **PUBLISHED,
    default_target: True


# `tessera plan` counts each rule's jobs from its shape in tessera.plan.JOB_SHAPES: check here, where
# both are known, that every rule has one and that its wildcards are that shape's.
for _rule in workflow.rules:
    _shape = JOB_SHAPES[_rule.name](CFG) if _rule.name in JOB_SHAPES else "undeclared"
    if _shape is not None and set(_rule.wildcard_names) != SHAPE_WILDCARDS.get(_shape):
        raise WorkflowError(f"rule {_rule.name}: wildcards {sorted(_rule.wildcard_names)} do not match its job shape "
                            f"{_shape!r} in tessera.plan.JOB_SHAPES: declare it there")
