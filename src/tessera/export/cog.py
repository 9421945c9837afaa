"""Float32 Cloud-Optimized GeoTIFFs of tiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

from tessera.io import atomic_path, check_raster_complete

COG_DIR = "cog"
_ROWS_PER_BLOCK = 256
# GDAL's block cache defaults to 5 % of RAM; a tile's COG needs far less.
_GDAL_CACHE_MB = 256


def tile_cog_path(output_dir: Path, tile_name: str, year: int) -> Path:
    """Where the assemble rule writes a tile's float32 COG."""
    return output_dir / COG_DIR / str(year) / f"{tile_name}_{year}.tif"


def write_tile_cog(embedding_path: Path, scales_path: Path, landmask_path: Path, out: Path, *, tags: dict[str, str]) -> None:
    """Write a tile's dequantised float32 embedding as a Cloud-Optimized GeoTIFF.

    Pixel-interleaved (a pixel's vector is one read), NaN nodata, DEFLATE with the floating-point
    predictor, overviews averaged from the dequantised values (averaging int8 codes would be
    meaningless), band descriptions as geotessera's exports (Tessera_Band_i). The COG covers the
    rows and columns of the tile grid that hold embeddings (on the tile grid, so it still mosaics
    without resampling): compressing and averaging all-NaN bands of a mostly empty tile took minutes.
    """
    codes = np.load(embedding_path, mmap_mode="r")
    scales = np.load(scales_path, mmap_mode="r")
    with rasterio.open(landmask_path) as landmask:
        crs, transform = landmask.crs, landmask.transform
    window = data_window(scales)
    codes = codes[window.toslices()]
    scales = scales[window.toslices()]
    transform = rasterio.windows.transform(window, transform)
    with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_MB), atomic_path(out) as tmp:
        # A tiled GeoTIFF first, written block by block (bounded memory); GDAL's COG driver then
        # copies it with overviews. It is named after the temporary output, so that what a killed
        # run leaves behind is removed by the next attempt (tessera.io.remove_stale_temporaries).
        staging = tmp.with_name(tmp.name + ".staging.tif")
        try:
            _write_staging(staging, codes, scales, crs, transform, tags)
            rasterio.shutil.copy(
                staging, tmp, driver="COG", compress="DEFLATE", predictor=3, blocksize=256,
                overview_resampling="average", bigtiff="IF_SAFER", num_threads=str(os.cpu_count() or 1),
            )
            check_raster_complete(tmp)
        finally:
            staging.unlink(missing_ok=True)


def data_window(scales: np.ndarray) -> rasterio.windows.Window:
    """The smallest window holding every pixel with an embedding (the whole grid if there is none)."""
    valid = np.isfinite(scales)
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return rasterio.windows.Window(0, 0, scales.shape[1], scales.shape[0])
    return rasterio.windows.Window(cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)


def _write_staging(staging: Path, codes: np.ndarray, scales: np.ndarray, crs, transform, tags: dict[str, str]) -> None:
    height, width, dims = codes.shape
    profile = dict(
        driver="GTiff", width=width, height=height, count=dims, dtype="float32", crs=crs, transform=transform,
        nodata=float("nan"), tiled=True, blockxsize=256, blockysize=256, interleave="pixel",
        compress="deflate", predictor=3, sparse_ok=True, bigtiff="if_safer",
    )
    with rasterio.open(staging, "w", **profile) as dst:
        for row in range(0, height, _ROWS_PER_BLOCK):
            rows = slice(row, min(row + _ROWS_PER_BLOCK, height))
            block = codes[rows].astype(np.float32) * scales[rows, :, None]
            if np.isnan(block).all():
                continue  # sparse: unwritten blocks read back as nodata
            window = rasterio.windows.Window(0, row, width, rows.stop - row)
            dst.write(np.moveaxis(block, -1, 0), window=window)
        dst.descriptions = tuple(f"Tessera_Band_{i}" for i in range(dims))
        dst.update_tags(AREA_OR_POINT="Area", **tags)
