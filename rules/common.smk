# Config validation, the parse-time plan, and what several rules share. Every path comes from
# tessera.layout (the same module the Python code uses), so a path is spelled once.
import json
import shlex
import sys

from tessera import config as tessera_config
from tessera import layout
from tessera.download import checkpoint_path, needs_download
from tessera.errors import UserError
from tessera.options import FetchOptions, InferOptions
from tessera.plan import JOB_SHAPES, SHAPE_WILDCARDS, make_plan

try:
    CFG = tessera_config.validate(config)
    PLAN = make_plan(CFG)
except UserError as error:
    # One line naming the bad input, not a traceback.
    print(f"tessera: error: {error}", file=sys.stderr)
    sys.exit(2)

# Snakemake's own DAG work grows with the job count (about 3 jobs per tile): past a few thousand
# tiles every dry-run and every cluster job's start gets slow, so say how to split the run.
COMFORTABLE_TILES = 3000
if len(PLAN.tiles) > COMFORTABLE_TILES:
    print(
        f"tessera: warning: {len(PLAN.tiles)} tiles make a DAG of about {3 * len(PLAN.tiles):,} jobs; Snakemake "
        f"handles up to ~{COMFORTABLE_TILES} tiles comfortably. Consider splitting the ROI into several runs "
        "(outputs join without seams), or building in parts with --batch publish=1/4 ... 4/4.",
        file=sys.stderr,
    )

YEAR = CFG["year"]
FAMILY = CFG["model"]["family"]
TILES = [t.name for t in PLAN.tiles]
ZONES = sorted({t.tile.epsg for t in PLAN.tiles})
WORK_DIR = CFG["work_dir"]
OUTPUT_DIR = CFG["output_dir"]
RESULTS = layout.Results(OUTPUT_DIR)
# Path patterns with the {tile} wildcard, shared by several rules. Rules name them as plain
# strings, never as rules.<name>.output: Snakemake checks every input of a rule that has such
# references against them by hashing the whole input list per file (quadratic in the tiles).
WORK_TILE = layout.WorkTile.at(WORK_DIR, YEAR, "{tile}")
EMBEDDING = str(RESULTS.embedding("{tile}", YEAR))
SCALES = str(RESULTS.scales("{tile}", YEAR))
LANDMASK = str(RESULTS.landmask("{tile}"))
COG = str(RESULTS.cog("{tile}", YEAR))
DEMO_CATALOG = str(layout.demo_catalog(WORK_DIR, YEAR))
# The checkpoint every model-reading job reads (an input of their rules): the demo's, a file as
# given, or the fixed cache path of a published name / hf:// reference (tessera.download: resolved
# offline; the download job fetches it while it is not there).
CHECKPOINT = (str(layout.demo_checkpoint(WORK_DIR, FAMILY)) if CFG["model"]["checkpoint"] == "demo"
              else checkpoint_path(CFG["model"]["checkpoint"], CFG["model"]["cache_dir"]))
ENV = "../envs/tessera.yaml"
# envs/tessera.yaml installs this checkout by this absolute path (pip expands it): Snakemake creates
# environments from a copy of the file under .snakemake/conda/, where a relative path would not lead here.
tessera_config.export_workflow_dir(workflow.basedir)
# Flags every job of a stage shares, built once from the config.
TILE_ARGS = f"--tile {{wildcards.tile}} --year {YEAR} --work-dir {shlex.quote(WORK_DIR)}"
ROI_ARGS = f"--roi {shlex.quote(CFG['roi'])} --patch-size {CFG['patch_size']}"


wildcard_constraints:
    tile=r"grid_-?\d+\.\d5_-?\d+\.\d5",
    patch=r"r\d+_c\d+",


def grows_with_attempt(base):
    """A resource (MB or minutes) that grows with each retry, so an OOM or timeout is not repeated."""
    return lambda wildcards, attempt: base * attempt


def roi_input():
    """The ROI file as an input (so editing it reruns what depends on it); nothing for a bbox."""
    from tessera.roi import is_bbox

    return [] if is_bbox(CFG["roi"]) else [CFG["roi"]]


def expand_tiles(pattern):
    return expand(pattern, tile=TILES)
