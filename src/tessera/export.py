"""Exports beyond the geotessera tile files: float32 COGs and the dataset sidecar."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

from tessera import __version__
from tessera.io import atomic_path, sha256_file

# geotessera's dataset versions by model family (tessera_metadata.json "dataset_version").
DATASET_VERSIONS = {"v1.0": "1.0", "v1.0-qat": "1.0", "v1.1": "1.1", "v2": "2.0"}
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


def write_metadata(
    out: Path, *, family: str, variant: str, checkpoint: Path, source: str, year: int, embeddings: list[Path]
) -> None:
    """geotessera's dataset sidecar, plus what made the embeddings (provenance)."""
    version = DATASET_VERSIONS[family]
    sidecar = {
        "dataset_version": version,
        "dataset_version_path": f"v{version}",
        "dataset_variant": variant,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generator": f"tessera-workflow {__version__}",
        "model_family": family,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "data_source": source,
        "years": [year],
        "tiles": sorted(p.stem for p in embeddings),
    }
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
