# Config validation, the parse-time plan and path helpers shared by every rule.
import json
import os
import shlex
import sys

from tessera import config as tessera_config
from tessera.errors import UserError
from tessera.grid import patch_name
from tessera.plan import make_plan

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
        "(outputs join without seams), or building in parts with --batch catalog=1/4 ... 4/4.",
        file=sys.stderr,
    )

YEAR = CFG["year"]
WORK = f"{CFG['work_dir']}/{YEAR}"
OUT = CFG["output_dir"]
FAMILY = CFG["model"]["family"]
TILES = [t.name for t in PLAN.tiles]
EMBED_DIR = f"{OUT}/global_0.1_degree_representation/{YEAR}"
LANDMASK_DIR = f"{OUT}/global_0.1_degree_tiff_all"
ENV = "../envs/tessera.yaml"
ZONES = sorted({t.tile.epsg for t in PLAN.tiles})
# Paths that several rules name. Rules refer to them as plain strings, not as rules.<name>.output:
# Snakemake checks every input of a rule that has such references against them, by hashing the
# whole input list per file, which made the dry-run of 1,000 tiles several seconds slower.
MANIFEST = f"{OUT}/manifest.parquet"
DEMO_CATALOG = f"{CFG['work_dir']}/demo/{YEAR}/catalog.json"
QUICKLOOKS = f"{OUT}/quicklook/{YEAR}"  # pca.json, {tile}_{year}.png and .tif


def output_dir_of_manifest(wildcards, input):
    """The output directory, derived from the manifest input rather than hard-coded."""
    return os.path.dirname(input.manifest)


wildcard_constraints:
    tile=r"grid_-?\d+\.\d5_-?\d+\.\d5",
    patch=r"r\d+_c\d+",


def grows_with_attempt(base):
    """A resource (MB or minutes) that grows with each retry, so an OOM or timeout is not repeated."""
    return lambda wildcards, attempt: base * attempt


# Inference holds a patch's whole time series (about 80 steps x P x P x 12 channels, as uint16 and
# as float32 model inputs): about 8 GB for 512 px patches, less for smaller ones.
INFER_MEM_MB = max(2000, int(8000 * (CFG["patch_size"] / 512) ** 2))
INFER_GPUS = 0 if CFG["device"] == "cpu" else 1


def window_arg(window):
    return f"{window.col_off},{window.row_off},{window.width},{window.height}"


def tile_window(wildcards):
    return window_arg(PLAN.by_name[wildcards.tile].window)


def patch_args(wildcards):
    """--patch arguments of an inference job: one patch, or every patch of the tile."""
    tile = PLAN.by_name[wildcards.tile]
    patches = [tile.patch(wildcards.patch)] if "patch" in wildcards.keys() else tile.patches
    return " ".join(f"--patch {window_arg(p)}" for p in patches)


def tile_patches(wildcards):
    """What assemble reads: the patch files, or the tile's patch folder (inference per tile)."""
    tile = PLAN.by_name[wildcards.tile]
    if CFG["infer"]["per"] == "tile":
        return [f"{WORK}/{tile.name}/patches"]
    return [f"{WORK}/{tile.name}/patches/{patch_name(p)}.npz" for p in tile.patches]


def checkpoint_path():
    if CFG["model"]["checkpoint"] == "demo":
        return f"{CFG['work_dir']}/demo/checkpoint-{FAMILY}.pt"
    return CFG["model"]["checkpoint"]


def roi_input():
    """The ROI file as an input (so editing it reruns what depends on it); nothing for a bbox."""
    from tessera.roi import is_bbox

    return [] if is_bbox(CFG["roi"]) else [CFG["roi"]]


def fetch_inputs(wildcards):
    inputs = {"roi": roi_input()}
    if CFG["source"] == "demo":
        inputs["catalog"] = DEMO_CATALOG
    return inputs


def fetch_options(sensor):
    fetch = CFG["fetch"]
    options = (
        f"--min-coverage-pct {fetch['min_coverage_pct']} --min-scenes {fetch['min_scenes']}"
        f" --patch-size {CFG['patch_size']}"
    )
    if sensor == "s2":
        options += f" --s2-resampling {fetch['s2_resampling']}"
    if CFG["source"] == "demo":
        options += f" --demo-catalog {DEMO_CATALOG}"
    if CFG["source"] == "stac":
        options += f" --source-options {shlex.quote(json.dumps(CFG['stac']))}"
    return options


INFER_COMMAND = (
    "tessera infer --stack {input.stack} {params.patches} --roi-mask {input.roi_mask}"
    " --checkpoint {input.checkpoint} --family {params.family} {params.checkpoint_flags} --device {params.device}"
    " --seed {params.seed} --repeat-times {params.repeat_times} --precision {params.precision}"
    " --batch-pixels {params.batch_pixels} --threads {threads}"
    " --out-dir {params.out_dir} 2> {log}"
)


INFER_PARAMS = dict(
    family=FAMILY,
    checkpoint_flags=" ".join(
        flag for flag, wanted in (("--trust-checkpoint", CFG["model"]["trust_checkpoint"]),
                                  ("--allow-source-mismatch", CFG["model"]["allow_source_mismatch"])) if wanted
    ),
    device=CFG["device"],
    seed=CFG["infer"]["seed"],
    repeat_times=CFG["infer"]["repeat_times"],
    precision=CFG["infer"]["precision"],
    batch_pixels=CFG["infer"]["batch_pixels"],
)


def all_outputs():
    outputs = expand(f"{EMBED_DIR}/{{tile}}/{{tile}}.npy", tile=TILES)
    outputs += expand(f"{EMBED_DIR}/{{tile}}/{{tile}}_scales.npy", tile=TILES)
    outputs += expand(f"{LANDMASK_DIR}/{{tile}}.tiff", tile=TILES)
    if CFG["export"]["cog"]:
        outputs += expand(f"{OUT}/cog/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES)
    outputs += [f"{OUT}/tessera_metadata.json", f"{OUT}/manifest.parquet", f"{OUT}/landmasks.parquet"]
    outputs += expand(f"{OUT}/observations/{YEAR}/{{tile}}_{YEAR}.tif", tile=TILES)
    outputs += [QUICKLOOKS]
    outputs += [f"{OUT}/stac/collection.json", f"{OUT}/report_{YEAR}.html"]
    if CFG["export"]["cog"]:
        outputs += expand(f"{OUT}/mosaic/{YEAR}/{{layer}}_{YEAR}_epsg{{epsg}}.vrt", layer=["tessera", "quicklook"], epsg=ZONES)
    return outputs
