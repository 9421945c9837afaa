"""Per-tile observation counts: how many valid Sentinel-2 and Sentinel-1 time steps each pixel had."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from tessera.fetch.encode import has_s1_code
from tessera.grid import Tile
from tessera.io import atomic_path, check_raster_complete
from tessera.stack import S1_ORBITS, open_s1, open_s2, verify_stack_index

BANDS = ("s2_valid_steps", "s1_valid_steps")


def write_observation_counts(stack_index: Path, out: Path) -> Path:
    """A 2-band uint16 GeoTIFF on the tile grid: valid S2 steps (SCL mask) and valid S1 steps
    (ascending + descending, VV or VH present) per pixel; 0 outside the tile's work window.

    Read one time step at a time, so memory stays at a few window-sized arrays.
    """
    stack = verify_stack_index(stack_index, checksums=False)
    tile = Tile.from_name(stack.index["tile"])
    col_off, row_off, width, height = stack.index["window"]
    s2, s1 = open_s2(stack.s2_path), open_s1(stack.s1_path)
    s2_count = np.zeros((height, width), np.uint16)
    for step in range(s2.masks.shape[0]):
        s2_count += s2.masks[step] > 0
    s1_count = np.zeros((height, width), np.uint16)
    for orbit in S1_ORBITS:
        sar = s1.orbit(orbit).arrays["sar"]
        for step in range(sar.shape[0]):
            s1_count += has_s1_code(sar[step])
    profile = dict(driver="GTiff", width=tile.width, height=tile.height, count=2, dtype="uint16", crs=tile.crs,
                   transform=tile.transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    window = rasterio.windows.Window(col_off, row_off, width, height)
    with atomic_path(out) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(s2_count, 1, window=window)
            dst.write(s1_count, 2, window=window)
            dst.descriptions = BANDS
        check_raster_complete(tmp)
    return out
