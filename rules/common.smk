# Config validation, the parse-time plan, and what several rules share. Every path comes from
# tessera.layout (the same module the Python code uses), so a path is spelled once.
import json
import shlex
import sys

from tessera import config as tessera_config
from tessera import layout
from tessera.assemble import ASSEMBLE_THREADS, memory_mb
from tessera.download import checkpoint_bytes, checkpoint_path, needs_download
from tessera.errors import UserError
from tessera.infer import memory_mb as infer_memory_mb
from tessera.models import family_entry
from tessera.options import FetchOptions, InferOptions
from tessera.period import claim_directories
from tessera.plan import JOB_SHAPES, SHAPE_WILDCARDS, make_plan

try:
    CFG = tessera_config.validate(config)
    # An output or work directory holds one kind of time series (period, S1 orbits): refuse another
    # before anything runs (tessera.period).
    DIRECTORIES = [("output_dir", CFG["output_dir"]), ("work_dir", CFG["work_dir"])]
    TIME_SERIES = FetchOptions.from_config(CFG).time_series
    claim_directories(DIRECTORIES, *TIME_SERIES, write=False)
    PLAN = make_plan(CFG)
except UserError as error:
    # One line naming the bad input, not a traceback.
    print(f"tessera: error: {error}", file=sys.stderr)
    sys.exit(2)


# A run (not a dry-run) records its kind of time series in the directories that record none yet.
onstart:
    claim_directories(DIRECTORIES, *TIME_SERIES, write=True)


# Snakemake's own DAG work grows with the job count (about 3 jobs per tile-year): past a few
# thousand tile-years every dry-run and every cluster job's start gets slow, so say how to split the run.
COMFORTABLE_TILES = 3000
if len(PLAN.tiles) * len(CFG["years"]) > COMFORTABLE_TILES:
    print(
        f"tessera: warning: {len(PLAN.tiles)} tiles x {len(CFG['years'])} years make a DAG of about "
        f"{3 * len(PLAN.tiles) * len(CFG['years']):,} jobs; Snakemake "
        f"handles up to ~{COMFORTABLE_TILES} tiles comfortably. Consider splitting the ROI into several runs "
        "(outputs join without seams), or building in parts with --batch all=1/4 ... 4/4.",
        file=sys.stderr,
    )

YEARS = CFG["years"]
FAMILY = CFG["model"]["family"]
TILES = [t.name for t in PLAN.tiles]
ZONES = sorted({t.tile.epsg for t in PLAN.tiles})
WORK_DIR = CFG["work_dir"]
OUTPUT_DIR = CFG["output_dir"]
RESULTS = layout.Results(OUTPUT_DIR)
# Path patterns with the {tile} wildcard, shared by several rules. Rules name them as plain
# strings, never as rules.<name>.output: Snakemake checks every input of a rule that has such
# references against them by hashing the whole input list per file (quadratic in the tiles).
WORK_TILE = layout.WorkTile.at(WORK_DIR, "{year}", "{tile}")
EMBEDDING = str(RESULTS.embedding("{tile}", "{year}"))
SCALES = str(RESULTS.scales("{tile}", "{year}"))
COG = str(RESULTS.cog("{tile}", "{year}"))
OBSERVATIONS = str(RESULTS.observations("{tile}", "{year}"))
DEMO_CATALOG = str(layout.demo_catalog(WORK_DIR, "{year}"))
# The checkpoint every model-reading job reads (an input of their rules): the demo's, a file as
# given, or the fixed cache path of a published name / hf:// reference (tessera.download: resolved
# offline; the download job fetches it while it is not there).
CHECKPOINT = (str(layout.demo_checkpoint(WORK_DIR, FAMILY)) if CFG["model"]["checkpoint"] == "demo"
              else checkpoint_path(CFG["model"]["checkpoint"], CFG["model"]["cache_dir"]))
ENV = "../envs/tessera.yaml"
PER_PATCH = CFG["infer"]["per"] == "patch"
# envs/tessera.yaml installs this checkout by this absolute path (pip expands it): Snakemake creates
# environments from a copy of the file under .snakemake/conda/, where a relative path would not lead here.
tessera_config.export_workflow_dir(workflow.basedir)
# Flags every job of a stage shares, built once from the config.
TILE_ARGS = f"--tile {{wildcards.tile}} --year {{wildcards.year}} --work-dir {shlex.quote(WORK_DIR)}"
ROI_ARGS = f"--roi {shlex.quote(CFG['roi'])} --patch-size {CFG['patch_size']}"


wildcard_constraints:
    tile=r"grid_-?\d+\.\d5_-?\d+\.\d5",
    year=r"\d{4}",
    patch=r"r\d+_c\d+",


def grows_with_attempt(base):
    """A resource (MB or minutes) that grows with each retry, so an OOM or timeout is not repeated."""
    return lambda wildcards, attempt: base * attempt


# Numbers per pixel of the assembled tiles: the export's Matryoshka prefix, else the family's
# (1,024 for the v2 teacher).
ASSEMBLE_DIMS = CFG["export"]["dims"] or family_entry(FAMILY).embedding_dims


def assemble_mem_mb(wildcards, attempt):
    """The assemble job's measured peak for its tile's ROI pixels and largest patch
    (tessera.assemble.memory_mb), times the attempt."""
    plan = PLAN.by_name[wildcards.tile]
    patch_pixels = max((int(p.width) * int(p.height) for p in plan.patches), default=0)
    pixels = int(plan.window.width) * int(plan.window.height)
    return memory_mb(pixels, ASSEMBLE_DIMS, patch_pixels, float32=CFG["export"]["float32"],
                     cog=CFG["export"]["cog"]) * attempt


def roi_input():
    """The ROI file as an input (so editing it reruns what depends on it); nothing for a bbox."""
    from tessera.roi import is_bbox

    return [] if is_bbox(CFG["roi"]) else [CFG["roi"]]


def expand_tiles(pattern):
    """A pattern with {tile} and {year} for every tile-year of the run."""
    return expand(pattern, tile=TILES, year=YEARS)


def patch_embeddings(wildcards):
    """What assemble reads with inference per patch: the tile's patch files."""
    work = layout.WorkTile.at(WORK_DIR, wildcards.year, wildcards.tile)
    return [str(work.patch(layout.patch_name(p))) for p in PLAN.by_name[wildcards.tile].patches]
