"""The run plan: tiles, work windows and patches, computed from the config alone.

This runs every time the Snakefile is read (by the driver and by every cluster job), so it is
offline and cheap: geometry only, no raster or network I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry

from tessera.errors import UserError
from tessera.grid import Tile, patch_name, patches, tiles_for_geometry, work_window
from tessera.roi import read_roi


@dataclass(frozen=True)
class TilePlan:
    tile: Tile
    window: Window  # pixels of the tile that the ROI touches
    patches: tuple[Window, ...]  # inference patches (tile pixel coordinates) that hold ROI pixels

    @property
    def name(self) -> str:
        return self.tile.name

    def patch(self, name: str) -> Window:
        for patch in self.patches:
            if patch_name(patch) == name:
                return patch
        raise KeyError(f"{self.name} has no patch {name}")


@dataclass(frozen=True)
class Plan:
    config: dict
    roi: BaseGeometry
    tiles: tuple[TilePlan, ...]

    @cached_property
    def by_name(self) -> dict[str, TilePlan]:
        return {t.name: t for t in self.tiles}

    def job_counts(self) -> Counter:
        """Jobs per rule, as `snakemake -n` will list them."""
        per_tile = ["roi_mask", "fetch_s2", "fetch_s1", "stack", "assemble"]
        if self.config["export"]["cog"]:
            per_tile.append("export_cog")
        counts = Counter({rule: len(self.tiles) for rule in per_tile})
        counts["infer"] = sum(len(t.patches) for t in self.tiles)
        counts["catalog"] = 1
        counts["all"] = 1
        if self.config["source"] == "demo":
            counts["demo_catalog"] = 1
        if self.config["model"]["checkpoint"] == "demo":
            counts["demo_checkpoint"] = 1
        return counts


def plan_tiles(roi: BaseGeometry, patch_size: int) -> list[TilePlan]:
    plans = []
    for tile, part in tiles_for_geometry(roi):
        window = work_window(tile, part)
        if window is None:
            continue
        projected = tile.project(part)
        kept = tuple(p for p in patches(window, patch_size) if tile.pixel_box(p).intersection(projected).area > 0)
        if kept:
            plans.append(TilePlan(tile, window, kept))
    return plans


def make_plan(config: dict) -> Plan:
    """Plan a validated config (see tessera.config.validate)."""
    roi = read_roi(config["roi"])
    west, south, east, north = roi.bounds
    approx_tiles = (math.floor(east * 10) - math.floor(west * 10) + 1) * (math.floor(north * 10) - math.floor(south * 10) + 1)
    tiles = plan_tiles(roi, config["patch_size"]) if approx_tiles <= 4 * config["max_tiles"] else None
    count = len(tiles) if tiles is not None else approx_tiles
    if tiles is None or count > config["max_tiles"]:
        raise UserError(
            f"roi {config['roi']!r} covers about {count} tiles of 0.1°, more than max_tiles={config['max_tiles']}: "
            "check the ROI, or raise max_tiles in the config if this size is intended"
        )
    if not tiles:
        raise UserError(f"roi {config['roi']!r} touches no pixel of any tile: give a larger region")
    return Plan(config, roi, tuple(tiles))
