# tessera-workflow: a region of interest and a year in, TESSERA embeddings out.
#
#   snakemake --configfile config/demo.yaml --cores 2      # the offline demo
#   snakemake -n --configfile my.yaml                       # preview every job, fetch nothing
#
# All logic lives in the `tessera` Python package; rules only call its CLI. The tile and patch
# lists are computed here from the ROI (geometry only: cheap and offline), so a dry-run lists every
# job and every cluster job can re-read this file quickly.
from snakemake.utils import min_version

min_version("9.20")


configfile: f"{workflow.basedir}/config/config.yaml"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/fetch.smk"
include: "rules/infer.smk"
include: "rules/export.smk"
include: "rules/outputs.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
