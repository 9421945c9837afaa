"""Bad input, met the way a user meets it: the `tessera` CLI (as the rules call it) and `snakemake -n`.

Every case must end in ONE line `tessera: error: ...` that names the input and the fix, a non-zero
exit, no traceback, and no output left behind.
"""

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.windows import Window
from shapely import box

from conftest import TINY_ROI, run_snakemake, write_tiny_config
from faults import truncate
from tessera.cli import main
from tessera.demo import generate_catalog
from tessera.grid import Tile
from tessera.models import make_demo_checkpoint
from tessera import layout
from tessera.layout import WorkTile, read_patch_embedding
from tessera.plan import plan_tiles
from tessera.roi import read_roi, write_roi_mask
from tessera.stack import Preprocessing, StackGrid, write_s1, write_s2, write_stack_index


def files_under(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*")}


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    """`tessera -q ARGS` in this process: exit code and the non-empty stderr lines (progress bars
    and log lines included, so that nothing but the error line can hide there)."""
    code = main(["-q", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.replace("\r", "\n").splitlines() if line.strip()]


def assert_one_error_line(code: int, lines: list[str], *fragments: str, only_line: bool = True) -> str:
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("tessera: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    if only_line:
        assert lines == errors, lines
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


# --- configs and ROIs: `tessera plan` ------------------------------------------------------------


def _points_geojson(path: Path) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [6.0, 52.04]}}]}))
    return path


def _shapefile_without_prj(path: Path) -> Path:
    wkb = np.array([shapely.to_wkb(box(5.998, 52.040, 6.002, 52.042))], dtype=object)
    pyogrio.raw.write(path, wkb, field_data=[], fields=[], crs="EPSG:4326", geometry_type="Polygon", driver="ESRI Shapefile")
    path.with_suffix(".prj").unlink()
    return path


def _mask_tif(path: Path, value: int, crs) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs=crs,
                       transform=Affine(10, 0, 700000, 0, -10, 5770000)) as dst:
        dst.write(np.full((8, 8), value, np.uint8), 1)
    return path


def _utm_coordinates_labelled_wgs84(path: Path) -> Path:
    # A common slip: UTM metres written into a file that declares (or defaults to) lon/lat.
    path.write_text(json.dumps({"type": "Feature", "properties": {},
                                "geometry": shapely.geometry.mapping(box(700000, 5770000, 701000, 5771000))}))
    return path


# (case id, config overrides or a function of the test directory returning them, fragments of the error)
CONFIG_CASES = [
    ("unknown key", {"yeer": 2024}, ["unknown key 'yeer'", "known keys"]),
    ("unknown nested key", {"model": {"famly": "v2"}}, ["unknown key 'famly' in 'model'"]),
    ("year as text", {"year": "2024"}, ["'year'", "is not a year, a list of years or a range"]),
    ("year out of range", {"year": 2030}, ["'year'", "maximum of 2025"]),
    ("year before Sentinel-2", {"year": 2014}, ["'year'", "minimum of 2017"]),
    ("patch size as float", {"patch_size": 64.5}, ["'patch_size'", "integer"]),
    ("unknown device", {"device": "tpu"}, ["'device'", "auto, cpu, cuda"]),
    ("bbox reversed", {"roi": "6.002,52.040,5.998,52.042"}, ["roi bbox", "reversed", "min < max"]),
    ("bbox out of range", {"roi": "5.998,95,6.002,96"}, ["roi bbox", "out of range", "lat in [-90, 90]"]),
    ("bbox with three numbers", {"roi": "5.998,52.040,6.002"}, ["roi bbox '5.998,52.040,6.002'", "give four"]),
    ("bbox with nan", {"roi": "nan,52.040,6.002,52.042"}, ["roi bbox", "non-finite"]),
    ("missing ROI file", {"roi": "no/such/roi.geojson"}, ["roi file 'no/such/roi.geojson' does not exist", "bbox"]),
    ("ROI with no area", lambda d: {"roi": str(_points_geojson(d / "points.geojson"))}, ["points.geojson", "no area", "buffer"]),
    ("shapefile without CRS", lambda d: {"roi": str(_shapefile_without_prj(d / "roi.shp"))}, ["roi.shp", "no CRS", "ogr2ogr -a_srs"]),
    ("GeoTIFF mask without CRS", lambda d: {"roi": str(_mask_tif(d / "mask.tif", 1, None))}, ["mask.tif", "no CRS", "gdal_edit"]),
    ("GeoTIFF mask all zero", lambda d: {"roi": str(_mask_tif(d / "mask.tif", 0, "EPSG:32631"))}, ["mask.tif", "no pixel > 0"]),
    ("ROI in the wrong CRS", lambda d: {"roi": str(_utm_coordinates_labelled_wgs84(d / "utm.geojson"))}, ["utm.geojson", "check its CRS"]),
    ("ROI not a vector file", lambda d: {"roi": str(_write(d / "roi.geojson", "not json"))}, ["roi.geojson", "cannot be read", "GeoJSON"]),
    ("ROI far larger than max_tiles", {"roi": "0,40,10,50"}, ["covers about", "max_tiles=2000", "raise max_tiles"]),
    ("checkpoint file missing", {"model": {"checkpoint": "no/such/weights.pt"}}, ["model.checkpoint 'no/such/weights.pt'", "demo"]),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_or_roi_is_one_line_naming_it(tmp_path, capsys, overrides, fragments):
    if callable(overrides):
        overrides = overrides(tmp_path)
    config = write_tiny_config(tmp_path, **overrides)
    before = files_under(tmp_path)
    code, lines = run_cli(capsys, "plan", "--config", str(config))
    assert_one_error_line(code, lines, *fragments)
    assert files_under(tmp_path) == before


def test_max_tiles_is_the_confirmation_of_a_large_roi(tmp_path, capsys):
    config = write_tiny_config(tmp_path, roi="5.9,52.0,6.2,52.2", max_tiles=5)
    code, lines = run_cli(capsys, "plan", "--config", str(config))
    assert_one_error_line(code, lines, "covers about 6 tiles", "max_tiles=5")
    confirmed = write_tiny_config(tmp_path, roi="5.9,52.0,6.2,52.2", max_tiles=6)
    assert main(["-q", "plan", "--config", str(confirmed)]) == 0


CONFIG_FILE_CASES = [
    ("unreadable YAML", "roi: [unclosed\n", ["not valid YAML", "line 2"]),
    ("tab indentation", "roi: '6,52,6.01,52.01'\nyear:\t2024\n", ["not valid YAML", "'\\t'", "line 2"]),
    ("key given twice", f"roi: '{TINY_ROI}'\nyear: 2023\nyear: 2024\n", ["key 'year' is given twice", "line 3"]),
    ("not a mapping", "- roi\n- year\n", ["must be a mapping"]),
    ("binary file", b"\x89PNG\r\n\x1a\n\xff\xfe\x00", ["not UTF-8 text"]),
    ("missing roi", "year: 2024\n", ["'roi' is required"]),
    ("impossible unquoted date", f"roi: '{TINY_ROI}'\nyear: 2024\nperiod: {{start: 2024-02-30, end: 2024-03-31}}\n",
     ["impossible date", "day is out of range", "quote it"]),
]


@pytest.mark.parametrize("content, fragments", [c[1:] for c in CONFIG_FILE_CASES], ids=[c[0] for c in CONFIG_FILE_CASES])
def test_broken_config_file_is_one_line_naming_it(tmp_path, capsys, content, fragments):
    path = tmp_path / "my.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, lines = run_cli(capsys, "plan", "--config", str(path))
    assert_one_error_line(code, lines, *fragments)


def test_config_path_that_is_missing_or_a_directory(tmp_path, capsys):
    code, lines = run_cli(capsys, "plan", "--config", str(tmp_path / "absent.yaml"))
    assert_one_error_line(code, lines, "absent.yaml", "does not exist")
    code, lines = run_cli(capsys, "plan", "--config", str(tmp_path))
    assert_one_error_line(code, lines, str(tmp_path), "cannot be read")


@pytest.mark.parametrize("overrides, fragment", [
    ({"roi": "6.002,52.040,5.998,52.042"}, "roi bbox '6.002,52.040,5.998,52.042' is reversed"),
    ({"fetch": {"min_scenes": 0}}, "config key 'fetch.min_scenes': 0 is less than the minimum of 1"),
], ids=["bad bbox", "bad nested value"])
def test_snakemake_dry_run_stops_with_the_same_line_and_creates_nothing(tmp_path, overrides, fragment):
    config = write_tiny_config(tmp_path, **overrides)
    workdir = tmp_path / "run"
    result = run_snakemake(workdir, "--configfile", str(config), "-n")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"tessera: error: {errors[0].removeprefix('tessera: error: ')}"] and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(p.is_file() for p in workdir.rglob("*"))


# --- checkpoints: `tessera infer` on a small synthetic stack ---------------------------------------

TILE = Tile.from_name("grid_6.05_52.05")
STACK_WINDOW = Window(100, 100, 16, 16)
STACK_ROI = "6.0,52.0,6.1,52.1"


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory) -> dict[str, Path]:
    """A tile's stack.json over a 16 px window (synthetic values), its ROI mask and a demo checkpoint."""
    work_dir = tmp_path_factory.mktemp("work")
    root = WorkTile.at(work_dir, 2024, TILE.name).root
    grid = StackGrid(TILE.name, 2024, STACK_WINDOW, f"EPSG:{TILE.epsg}", TILE.window_transform(STACK_WINDOW), "demo", "mpc",
                     Preprocessing.expected_by("v2", "mpc"))
    rng = np.random.default_rng(0)
    shape = (16, 16)
    with write_s2(root / "s2.zarr", grid, chunk=16) as s2:
        for day in range(1, 300, 30):
            s2.append(dt.date(2024, 1, 1) + dt.timedelta(days=day), [f"s2-{day}"],
                      rng.integers(200, 5000, (*shape, 10), dtype=np.uint16), np.ones(shape, np.uint8))
    with write_s1(root / "s1.zarr", grid, chunk=16) as s1:
        for day in range(5, 300, 40):
            for orbit in ("ascending", "descending"):
                s1.append(orbit, dt.date(2024, 1, 1) + dt.timedelta(days=day), [f"s1-{orbit}-{day}"],
                          rng.integers(5000, 12000, (*shape, 2), dtype=np.int16))
    write_stack_index(root / "s2.zarr", root / "s1.zarr", root / "stack.json")
    write_roi_mask(read_roi(STACK_ROI), TILE, root / "roi.tif")
    make_demo_checkpoint(root / "v2.pt", family="v2")
    return {"work_dir": work_dir, "v2": root / "v2.pt", "patches": WorkTile.at(work_dir, 2024, TILE.name).patches}


def infer_args(small_stack, checkpoint: Path, family: str = "v2") -> list[str]:
    """`tessera infer` of the stack's one patch: at patch size 20 the whole-tile ROI has a patch at (100, 100)."""
    return ["infer", "--tile", TILE.name, "--year", "2024", "--work-dir", str(small_stack["work_dir"]),
            "--roi", STACK_ROI, "--patch-size", "20", "--patch", "r100_c100",
            "--checkpoint", str(checkpoint), "--family", family, "--device", "cpu"]


def test_infer_fixture_embeds_with_a_good_checkpoint(small_stack, tmp_path, capsys):
    """The control: with the demo checkpoint the same command writes the patch."""
    code = main(["-q", *infer_args(small_stack, small_stack["v2"])])
    capsys.readouterr()
    assert code == 0
    embedding = read_patch_embedding(small_stack["patches"] / "r100_c100.npz")
    assert embedding.shape == (20, 20, 128) and np.isfinite(embedding[:16, :16]).all()  # the stack is 16 px wide
    shutil.rmtree(small_stack["patches"])


def _wrong_family(small_stack, directory: Path) -> Path:
    make_demo_checkpoint(directory / "v1_1.pt", family="v1.1")
    return directory / "v1_1.pt"


def _truncated(small_stack, directory: Path) -> Path:
    path = directory / "truncated.pt"
    shutil.copyfile(small_stack["v2"], path)
    truncate(path, 0.5)
    return path


def _missing_key(small_stack, directory: Path) -> Path:
    payload = torch.load(small_stack["v2"], weights_only=True)
    state = next(value for value in payload.values() if isinstance(value, dict) and len(value) > 10)
    state.pop(sorted(state)[0])
    torch.save(payload, directory / "missing_key.pt")
    return directory / "missing_key.pt"


class _Opaque:
    """Stands for any pickled object that is not a tensor or a plain container."""


def _non_tensor_pickle(small_stack, directory: Path) -> Path:
    payload = torch.load(small_stack["v2"], weights_only=True)
    payload["optimizer_hook"] = _Opaque()
    torch.save(payload, directory / "pickled.pt")
    return directory / "pickled.pt"


CHECKPOINT_CASES = [
    ("wrong family", _wrong_family, ["v1_1.pt", "looks like family v1.1, not v2", "set the model family to v1.1"]),
    ("truncated file", _truncated, ["truncated.pt", "truncated or not a PyTorch checkpoint", "download it again"]),
    ("missing keys", _missing_key, ["missing_key.pt", "does not fit the model", "missing"]),
    ("non-tensor pickle", _non_tensor_pickle, ["pickled.pt", "holds more than tensors", "--trust-checkpoint"]),
    ("text file", lambda s, d: _write(d / "notes.pt", "these are not weights\n"), ["notes.pt", "not a PyTorch checkpoint"]),
    ("missing file", lambda s, d: d / "absent.pt", ["absent.pt", "does not exist"]),
]


@pytest.mark.parametrize("make, fragments", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_stops_inference_with_one_line(small_stack, tmp_path, capsys, make, fragments):
    checkpoint = make(small_stack, tmp_path)
    code, lines = run_cli(capsys, *infer_args(small_stack, checkpoint))
    assert_one_error_line(code, lines, *fragments)
    out_dir = small_stack["patches"]
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


# --- data: `tessera fetch` against the demo STAC API ---------------------------------------------

CATALOG_BBOX = (5.998, 52.040, 6.002, 52.042)
FAR_ROI = "6.21,52.041,6.212,52.043"  # tile grid_6.25_52.05, 0.2° east of every demo scene


@pytest.fixture(scope="module")
def demo_catalog(tmp_path_factory) -> Path:
    return generate_catalog(tmp_path_factory.mktemp("catalog") / "demo", 2024, CATALOG_BBOX, seed=5,
                            s2_revisit_days=60, s1_revisit_days=90)


def _fetch(capsys, tmp_path: Path, catalog: Path, roi: str) -> tuple[int, list[str], Path]:
    """`tessera fetch` of the ROI's zone-32 tile from ``catalog`` (linked where the layout expects it)."""
    (tile_plan,) = [t for t in plan_tiles(read_roi(roi), 16) if t.tile.epsg == 32632]
    work_dir = tmp_path / "work"
    layout.demo_catalog(work_dir, 2024).parent.parent.mkdir(parents=True)
    layout.demo_catalog(work_dir, 2024).parent.symlink_to(catalog.parent)
    code, lines = run_cli(capsys, "fetch", "--tile", tile_plan.name, "--year", "2024", "--work-dir", str(work_dir),
                          "--output-dir", str(tmp_path / "results"), "--roi", roi, "--source", "demo",
                          "--patch-size", "16")
    return code, lines, WorkTile.at(work_dir, 2024, tile_plan.name).s2


def _copy_catalog(catalog: Path, directory: Path) -> Path:
    shutil.copytree(catalog.parent, directory)
    return directory / "catalog.json"


def _s2_items(catalog: Path) -> list[Path]:
    return sorted((catalog.parent / "sentinel-2-l2a").glob("*/*.json"))


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not out.parent.exists() or [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_empty_search_fails_the_tile_naming_it(demo_catalog, tmp_path, capsys):
    code, lines, out = _fetch(capsys, tmp_path, demo_catalog, FAR_ROI)
    assert_one_error_line(code, lines, "tile grid_6.25_52.05", "0 usable Sentinel-2 dates in 2024", "(no scene found)",
                          "check the source's coverage of this tile", only_line=False)
    assert not any("too little valid coverage" in line for line in lines)  # nothing was found to have too little
    assert_nothing_left(out)


def test_scenes_that_do_not_cover_the_tile_fail_it_naming_it(demo_catalog, tmp_path, capsys):
    # Footprints that claim the far tile while the rasters stay where they are: every read is no-data.
    catalog = _copy_catalog(demo_catalog, tmp_path / "claims")
    far = box(6.2, 52.0, 6.3, 52.1)
    for path in _s2_items(catalog):
        item = json.loads(path.read_text())
        item["geometry"], item["bbox"] = shapely.geometry.mapping(far), list(far.bounds)
        path.write_text(json.dumps(item))
    code, lines, out = _fetch(capsys, tmp_path, catalog, FAR_ROI)
    error = assert_one_error_line(code, lines, "tile grid_6.25_52.05", "0 usable Sentinel-2 dates",
                                  "too little valid coverage", "min_coverage_pct", only_line=False)
    assert int(re.search(r"(\d+) scenes found", error).group(1)) > 0
    assert_nothing_left(out)


def test_an_all_cloud_year_fails_the_tile_naming_it(demo_catalog, tmp_path, capsys):
    catalog = _copy_catalog(demo_catalog, tmp_path / "cloudy")
    for scl in (catalog.parent / "sentinel-2-l2a").glob("*/SCL.tif"):
        with rasterio.open(scl) as src:
            profile, data = src.profile, src.read(1)
        with rasterio.open(scl, "w", **profile) as dst:
            dst.write(np.where(data > 0, 9, 0).astype(data.dtype), 1)  # 9: cloud, high probability
    code, lines, out = _fetch(capsys, tmp_path, catalog, TINY_ROI)
    assert_one_error_line(code, lines, "tile grid_6.05_52.05", "0 usable Sentinel-2 dates in 2024",
                          "no scene failed", "too little valid coverage", only_line=False)
    assert_nothing_left(out)


@pytest.mark.parametrize("command", [["assemble", "--tile", "grid_6.05_52.05", "--year", "2024"], ["publish"]])
def test_thread_counts_below_one_are_refused_by_the_command_line(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads: 0 is not at least 1" in capsys.readouterr().err
