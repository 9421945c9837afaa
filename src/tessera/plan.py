"""The run plan: tiles, work windows and patches, computed from the config alone.

This runs every time the Snakefile is read (by the driver and by every cluster job), so it is
offline and cheap: geometry only, no raster or network I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry

from tessera.download import hub_file, needs_download
from tessera.errors import UserError
from tessera.grid import Tile, patches, roi_in_tile, tiles_for_geometry, work_window
from tessera.layout import WorkTile
from tessera.models import family_entry
from tessera.io import atomic_path
from tessera.options import FetchOptions
from tessera.period import ALL_ORBITS, DateRange, kept_orbits, orbit_of
from tessera.roi import is_bbox, read_roi


@dataclass(frozen=True)
class TilePlan:
    tile: Tile
    window: Window  # pixels of the tile that the ROI touches
    patches: tuple[Window, ...]  # inference patches (tile pixel coordinates) that hold ROI pixels

    @property
    def name(self) -> str:
        return self.tile.name


@dataclass(frozen=True)
class Plan:
    config: dict
    roi: BaseGeometry
    tiles: tuple[TilePlan, ...]

    @cached_property
    def by_name(self) -> dict[str, TilePlan]:
        return {t.name: t for t in self.tiles}

    def job_counts(self) -> Counter:
        """Jobs per rule, as `snakemake -n` will list them, from the rules' shapes (``JOB_SHAPES``)."""
        years = len(self.config["years"])
        per = {"run": 1, "year": years, "tile": len(self.tiles) * years,
               "patch": sum(len(t.patches) for t in self.tiles) * years}
        counts = Counter()
        for rule, shape in JOB_SHAPES.items():
            keyed_by = shape(self.config)
            if keyed_by:
                counts[rule] = per[keyed_by]
        return counts


# What the jobs of each rule are keyed by, given the config ("run": one job; None: no job). The rule
# files (rules/*.smk) declare their outputs with these wildcards, and the Snakefile checks, when it
# is read, that every rule is here with the wildcards its shape says.
JOB_SHAPES = {
    "demo_catalog": lambda config: "year" if config["source"] == "demo" else None,
    "demo_checkpoint": lambda config: "run" if config["model"]["checkpoint"] == "demo" else None,
    "download": lambda config: "run" if needs_download(config["model"]["checkpoint"], config["model"]["cache_dir"]) else None,
    "fetch": lambda config: "tile",
    "infer": lambda config: config["infer"]["per"],
    "assemble": lambda config: "tile",
    "publish": lambda config: "run",
    "all": lambda config: "run",
}
# The wildcards of each shape's outputs: "tile" and "patch" jobs are per year too.
SHAPE_WILDCARDS = {"run": set(), "year": {"year"}, "tile": {"tile", "year"}, "patch": {"tile", "year", "patch"}}


# Sizing assumptions of `tessera plan`, per tile-year (a whole year, both S1 directions; a period or
# one direction scales them), used where no cached search says better.
# Sentinel-2: a 5-day revisit, and about 1.5 granules per date (MGRS tiles overlap);
# Sentinel-1: one pass every 6 days in each direction in Europe (fewer elsewhere).
TYPICAL_S2_ITEMS = 110
TYPICAL_S2_DATES = 73
TYPICAL_S1_ITEMS = 120
# Bytes read per window pixel and scene, uncompressed: S2 4 bands at 10 m + 6 at 20 m (uint16)
# + SCL at 20 m (uint8); S1 VV + VH float32 at 10 m. COG compression typically halves this.
S2_BYTES_PER_PIXEL = 4 * 2 + 6 * 2 / 4 + 1 / 4
S1_BYTES_PER_PIXEL = 2 * 4
# Stack bytes per pixel and time step, uncompressed: S2 10 × uint16 + mask; S1 2 × int16.
STACK_S2_BYTES = 10 * 2 + 1
STACK_S1_BYTES = 2 * 2
# Tile COG bytes per float32 value of the embedded pixels, overviews included: 0.82 measured on
# the demo's two tiles (DEFLATE + float predictor; random-weight embeddings, which compress worse
# than real ones, so an upper bound).
COG_BYTES_PER_VALUE = 4 * 0.82


def _cached_items(path: Path) -> list[dict] | None:
    """The properties of the items in a cached search result (the fetch stage writes it), or None
    when there is none."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    items = data.get("features", []) if isinstance(data, dict) else data
    return [item.get("properties", {}) for item in items]


def plan_tile(roi: BaseGeometry, tile: Tile, patch_size: int) -> TilePlan | None:
    """A tile's work window and the patches that hold ROI pixels; None if the ROI touches none."""
    projected = roi_in_tile(tile, roi)
    window = work_window(tile, projected)
    if window is None:
        return None
    kept = tuple(p for p in patches(window, patch_size) if tile.pixel_box(p).intersection(projected).area > 0)
    return TilePlan(tile, window, kept) if kept else None


def plan_tiles(roi: BaseGeometry, patch_size: int) -> list[TilePlan]:
    return [plan for tile, _ in tiles_for_geometry(roi) if (plan := plan_tile(roi, tile, patch_size))]


# The tiles of a country take seconds to plan (about a millisecond a tile), and the Snakefile plans
# them again on every read: at the driver's start and at every cluster job's. The plan is kept in
# the work directory, keyed by everything it follows from (the ROI's text and file contents, the
# patch size, the planning code), so that later reads load it instead.
_PLAN_CODE = (Path(__file__).with_name("grid.py"), Path(__file__))


def _plan_key(config: dict) -> str:
    digest = hashlib.sha256(json.dumps([config["roi"], config["patch_size"]]).encode())
    roi_file = Path(config["roi"])
    for path in (*([roi_file] if not is_bbox(config["roi"]) and roi_file.is_file() else []), *_PLAN_CODE):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def cached_plan_tiles(config: dict, roi: BaseGeometry) -> list[TilePlan]:
    """``plan_tiles`` of the config's ROI, from ``{work_dir}/plan/`` when it was planned before."""
    cache = Path(config["work_dir"]) / "plan" / f"tiles-{_plan_key(config)}.json"
    if cache.is_file():
        try:
            return [TilePlan(Tile(lon, lat), Window(*window), tuple(Window(*p) for p in kept))
                    for lon, lat, window, kept in json.loads(cache.read_text())]
        except (ValueError, TypeError):
            pass  # damaged: plan again and replace it
    tiles = plan_tiles(roi, config["patch_size"])
    rows = [[t.tile.lon_index, t.tile.lat_index, _window_row(t.window), [_window_row(p) for p in t.patches]]
            for t in tiles]
    try:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps(rows))
    except OSError:
        pass  # a read-only work directory only costs the next read its planning time
    return tiles


def _window_row(window: Window) -> list[int]:
    return [int(window.col_off), int(window.row_off), int(window.width), int(window.height)]


def _check_checkpoint(model: dict) -> None:
    """model.checkpoint is a file, demo, or a Hub file of the configured family (no network here)."""
    file = hub_file(model["checkpoint"])
    if file is not None and file.family is not None and file.family != model["family"]:
        raise UserError(f"model.checkpoint {model['checkpoint']} is a {file.family} checkpoint, but model.family is "
                        f"{model['family']}: set model.family to {file.family} (or leave it out)")


def make_plan(config: dict) -> Plan:
    """Plan a validated config (see tessera.config.validate)."""
    _check_checkpoint(config["model"])
    roi = read_roi(config["roi"])
    west, south, east, north = roi.bounds
    approx_tiles = (math.floor(east * 10) - math.floor(west * 10) + 1) * (math.floor(north * 10) - math.floor(south * 10) + 1)
    tiles = cached_plan_tiles(config, roi) if approx_tiles <= 4 * config["max_tiles"] else None
    count = len(tiles) if tiles is not None else approx_tiles
    if tiles is None or count > config["max_tiles"]:
        raise UserError(
            f"roi {config['roi']!r} covers about {count} tiles of 0.1°, more than max_tiles={config['max_tiles']}: "
            "check the ROI, or raise max_tiles in the config if this size is intended"
        )
    if not tiles:
        raise UserError(f"roi {config['roi']!r} touches no pixel of any tile: give a larger region")
    return Plan(config, roi, tuple(tiles))


def estimates(plan: Plan) -> dict[str, float]:
    """What a run will cost, over every tile-year: scenes, bytes downloaded, stack bytes on disk, compute."""
    cfg = plan.config
    period, s1_orbit_state = FetchOptions.from_config(cfg).time_series
    s1_share = 1.0 if s1_orbit_state == ALL_ORBITS else 0.5
    totals = Counter()
    for year in cfg["years"]:
        share = period.dates(year).days / DateRange.whole_year(year).days
        for t in plan.tiles:
            pixels = t.window.width * t.window.height
            work = WorkTile.at(cfg["work_dir"], year, t.name)
            s2_items, s1_items = _cached_items(work.search("s2")), _cached_items(work.search("s1"))
            if s2_items is not None:
                s2_items = len(s2_items)
            if s1_items is not None:  # the items of the orbit directions the fetch keeps (S1 searches find both)
                s1_items = sum(orbit_of(properties) in kept_orbits(s1_orbit_state) for properties in s1_items)
            totals["cached_searches"] += (s2_items is not None) + (s1_items is not None)
            s2_items = round(TYPICAL_S2_ITEMS * share) if s2_items is None else s2_items
            s1_items = round(TYPICAL_S1_ITEMS * share * s1_share) if s1_items is None else s1_items
            totals["s2_scenes"] += s2_items
            totals["s1_scenes"] += s1_items
            totals["download_bytes"] += pixels * (s2_items * S2_BYTES_PER_PIXEL + s1_items * S1_BYTES_PER_PIXEL)
            totals["stack_bytes"] += pixels * (min(s2_items, TYPICAL_S2_DATES * share) * STACK_S2_BYTES
                                               + s1_items * STACK_S1_BYTES)
            totals["pixels"] += sum(p.width * p.height for p in t.patches)
    totals["macs"] = totals["pixels"] * family_entry(cfg["model"]["family"]).macs_per_pixel
    # int8 codes + a float32 scale per pixel of every tile-year; COGs of the embedded pixels; the
    # optional float32 .npy.
    dims = cfg["export"]["dims"] or 128
    tile_pixels = sum(t.tile.width * t.tile.height for t in plan.tiles) * len(cfg["years"])
    totals["output_bytes"] = tile_pixels * (dims + 4)
    totals["cog_bytes"] = totals["pixels"] * dims * COG_BYTES_PER_VALUE if cfg["export"]["cog"] else 0
    totals["float32_bytes"] = tile_pixels * dims * 4 if cfg["export"]["float32"] else 0
    return dict(totals)
