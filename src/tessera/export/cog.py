"""Float32 Cloud-Optimized GeoTIFFs of tiles."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

from tessera.io import atomic_path

_ROWS_PER_BLOCK = 256


def write_tile_cog(embedding_path: Path, scales_path: Path, landmask_path: Path, out: Path, *, tags: dict[str, str]) -> None:
    """Write a tile's dequantised float32 embedding as a Cloud-Optimized GeoTIFF.

    Pixel-interleaved (a pixel's vector is one read), NaN nodata, DEFLATE with the floating-point
    predictor, overviews averaged from the dequantised values (averaging int8 codes would be
    meaningless), band descriptions as geotessera's exports (Tessera_Band_i).
    """
    codes = np.load(embedding_path, mmap_mode="r")
    scales = np.load(scales_path, mmap_mode="r")
    height, width, dims = codes.shape
    with rasterio.open(landmask_path) as landmask:
        crs, transform = landmask.crs, landmask.transform
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".staging-") as staging_dir:
        staging = Path(staging_dir) / "staging.tif"
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
        with atomic_path(out) as tmp:
            rasterio.shutil.copy(
                staging, tmp, driver="COG", compress="DEFLATE", predictor=3, blocksize=256,
                overview_resampling="average", bigtiff="IF_SAFER", num_threads=str(os.cpu_count() or 1),
            )
