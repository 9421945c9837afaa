"""Change maps: the per-pixel cosine distance between a tile's embeddings of two years.

The first thing a change-detection user computes: 0 where a pixel's embedding did not change
direction, up to 2 where it reversed; NaN where either year has no embedding. Per tile, on the tile
grid, as a float32 COG (``change/{A}_{B}/{tile}_{A}_{B}.tif``) and a PNG for looking at
(distance 0 → black, ≥ ``PNG_FULL_SCALE`` → white, transparent where NaN).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

from tessera.errors import UserError
from tessera.io import atomic_path, check_raster_complete
from tessera.layout import Results, TileFiles, find_tiles

log = logging.getLogger(__name__)

# Distance shown as white in the PNG: embeddings of unchanged land stay well below it.
PNG_FULL_SCALE = 1.0
_ROWS_PER_BLOCK = 256


def cosine_distance(first: TileFiles, second: TileFiles) -> np.ndarray:
    """float32 (H, W): 1 − cos(angle) between the two tile-years' embeddings; NaN where either has none.

    The int8 codes are enough: a pixel's positive scale does not change its direction. Products and
    squared norms are exact integers, so a pixel compared with itself is exactly 0.
    """
    codes_a, codes_b = np.load(first.embedding, mmap_mode="r"), np.load(second.embedding, mmap_mode="r")
    if codes_a.shape != codes_b.shape:
        raise UserError(f"{first.embedding} is {codes_a.shape} but {second.embedding} is {codes_b.shape}: change "
                        "maps need embeddings of the same model and dimensions")
    valid = np.isfinite(np.load(first.scales)) & np.isfinite(np.load(second.scales))
    distance = np.full(codes_a.shape[:2], np.nan, np.float32)
    for row in range(0, codes_a.shape[0], _ROWS_PER_BLOCK):
        rows = slice(row, row + _ROWS_PER_BLOCK)
        a, b = codes_a[rows].astype(np.int64), codes_b[rows].astype(np.int64)
        norms = np.sqrt((np.einsum("ijk,ijk->ij", a, a) * np.einsum("ijk,ijk->ij", b, b)).astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.einsum("ijk,ijk->ij", a, b) / norms
        distance[rows] = np.where(valid[rows] & (norms > 0), 1.0 - np.clip(cosine, -1.0, 1.0), np.nan)
    return distance


def write_change_map(first: TileFiles, second: TileFiles, results: Results) -> tuple[Path, Path]:
    """The (COG, PNG) change map of one tile between two years; returns their paths."""
    distance = cosine_distance(first, second)
    cog, png = results.change(first.tile.name, first.year, second.year)
    tile = first.tile
    profile = dict(driver="GTiff", width=tile.width, height=tile.height, count=1, dtype="float32", crs=tile.crs,
                   transform=tile.transform, nodata=float("nan"), tiled=True, blockxsize=256, blockysize=256)
    cog.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cog.parent, prefix=".staging-") as staging_dir:
        staging = Path(staging_dir) / "distance.tif"
        with rasterio.open(staging, "w", **profile) as dst:
            dst.write(distance, 1)
            dst.update_tags(TESSERA_CHANGE=f"cosine distance {first.year} -> {second.year}")
        with atomic_path(cog) as tmp:
            rasterio.shutil.copy(staging, tmp, driver="COG", compress="DEFLATE", predictor=3, blocksize=256,
                                 overview_resampling="average")
            check_raster_complete(tmp)
    grey = np.nan_to_num(np.clip(distance / PNG_FULL_SCALE, 0.0, 1.0) * 255, nan=0.0).astype(np.uint8)
    alpha = np.where(np.isfinite(distance), 255, 0).astype(np.uint8)
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), atomic_path(png) as tmp:
        with rasterio.open(tmp, "w", driver="PNG", width=tile.width, height=tile.height, count=2, dtype="uint8") as dst:
            dst.write(np.stack([grey, alpha]))
        check_raster_complete(tmp)
    return cog, png


def write_change_maps(results: Results, first_year: int, second_year: int) -> list[tuple[Path, Path]]:
    """Change maps of every tile that has both years in an output directory."""
    present = {(files.tile.name, files.year): files for files in find_tiles(results) if files.present}
    pairs = [(files, present[(name, second_year)]) for (name, year), files in sorted(present.items())
             if year == first_year and (name, second_year) in present]
    if not pairs:
        raise UserError(f"{results.root} has no tile with embeddings of both {first_year} and {second_year}: run "
                        "the workflow for both years first")
    written = [write_change_map(first, second, results) for first, second in pairs]
    log.info("wrote %d change maps %d -> %d", len(written), first_year, second_year)
    return written
