"""PCA quicklooks: the first three principal components of the embeddings as an RGB picture.

One PCA basis and one colour stretch are fitted for the whole run (on a seeded sample of at most
~100k pixels drawn across all tiles and years), so neighbouring tiles get the same colours and their
quicklooks join without seams, and the years of a tile compare by colour. Per tile we write an RGBA PNG (transparent where there is no embedding) and a
small uint8 RGB + alpha COG on the tile grid with overviews:

```
{out}/quicklook/{year}/pca.json              the fitted basis and stretch (the same for every year)
{out}/quicklook/{year}/{tile}_{year}.png
{out}/quicklook/{year}/{tile}_{year}.tif
```
"""

from __future__ import annotations

import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window
from tqdm import tqdm

from tessera.errors import UserError
from tessera.layout import Results, TileFiles
from tessera.io import atomic_path, check_raster_complete

_ROWS_PER_BLOCK = 256
# Percentiles of the sampled components mapped to 0 and 255: a robust stretch that ignores outliers.
STRETCH_PERCENTILES = (2.0, 98.0)


def write_quicklooks(tile_files: list[TileFiles], results: Results, *, threads: int = 1) -> None:
    """Fit one PCA basis on all tile-years, save it in every year's folder, and write every quicklook,
    ``threads`` tiles at a time (the work is in numpy and GDAL, which release the GIL)."""
    basis = fit_pca(tile_files)
    for year in sorted({files.year for files in tile_files}):
        basis.save(results.quicklooks(year) / "pca.json")

    def write(files: TileFiles) -> None:
        write_tile_quicklook(files, basis, *results.quicklook(files.tile.name, files.year))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for _ in tqdm(pool.map(write, tile_files), total=len(tile_files), desc="quicklooks", unit="tile", file=sys.stderr):
            pass


@dataclass(frozen=True)
class PcaBasis:
    """Three principal axes of the dequantised embeddings and the stretch that maps them to 0–255."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (3, D), unit rows, sign fixed so that each row's largest loading is positive
    low: np.ndarray  # (3,) component values shown as 0
    high: np.ndarray  # (3,) component values shown as 255

    def to_rgb(self, embeddings: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) colours of float embeddings (..., D); rows with NaN come out black."""
        projected = (embeddings.astype(np.float64) - self.mean) @ self.components.T
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        unit = np.clip((projected - self.low) / span, 0.0, 1.0)
        return np.nan_to_num(np.rint(unit * 255), nan=0.0).astype(np.uint8)

    def save(self, path: Path) -> None:
        fields = {name: getattr(self, name).tolist() for name in ("mean", "components", "low", "high")}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(fields) + "\n")


def fit_pca(tile_files: list[TileFiles], *, max_pixels: int = 100_000, seed: int = 0) -> PcaBasis:
    """Fit the run's PCA basis on a seeded uniform sample of the pixels that have an embedding."""
    valid_counts = [int(np.isfinite(np.load(f.scales, mmap_mode="r")).sum()) for f in tile_files]
    total = sum(valid_counts)
    if total < 3:
        raise UserError(f"{total} embedded pixel(s) in {len(tile_files)} tile(s): too few for a PCA quicklook; check the run's coverage")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(total, max_pixels), replace=False))
    samples, first = [], 0
    for files, count in zip(tile_files, valid_counts):
        picked = chosen[(chosen >= first) & (chosen < first + count)] - first
        first += count
        if picked.size == 0:
            continue
        scales = np.load(files.scales, mmap_mode="r")
        rows, cols = np.nonzero(np.isfinite(scales))
        rows, cols = rows[picked], cols[picked]
        codes = np.load(files.embedding, mmap_mode="r")
        samples.append(codes[rows, cols].astype(np.float64) * scales[rows, cols, None])
    sample = np.concatenate(samples)
    if sample.shape[1] < 3:
        raise UserError(f"embeddings have {sample.shape[1]} dimension(s): a PCA quicklook needs at least 3")
    mean = sample.mean(axis=0)
    _, _, axes = np.linalg.svd(sample - mean, full_matrices=False)
    components = axes[:3]
    # SVD leaves each axis's sign arbitrary; fixing it keeps colours stable between runs and machines.
    largest = np.abs(components).argmax(axis=1)
    components = components * np.sign(components[np.arange(3), largest])[:, None]
    projected = (sample - mean) @ components.T
    low, high = np.percentile(projected, STRETCH_PERCENTILES, axis=0)
    return PcaBasis(mean, components, low, high)


def write_tile_quicklook(files: TileFiles, basis: PcaBasis, png: Path, cog: Path) -> None:
    """Write a tile's quicklook as an RGBA PNG and an RGB + alpha COG (alpha 0 = no embedding)."""
    tile = files.tile
    codes = np.load(files.embedding, mmap_mode="r")
    scales = np.load(files.scales, mmap_mode="r")
    cog.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cog.parent, prefix=".staging-") as staging_dir:
        staging = Path(staging_dir) / "rgba.tif"
        profile = dict(
            driver="GTiff", width=tile.width, height=tile.height, count=4, dtype="uint8", crs=tile.crs,
            transform=tile.transform, photometric="RGB", alpha="YES", tiled=True, blockxsize=256, blockysize=256,
            interleave="pixel", compress="deflate",
        )
        with rasterio.open(staging, "w", **profile) as dst:
            for row in range(0, tile.height, _ROWS_PER_BLOCK):
                rows = slice(row, min(row + _ROWS_PER_BLOCK, tile.height))
                valid = np.isfinite(scales[rows])
                rgb = basis.to_rgb(codes[rows].astype(np.float32) * scales[rows, :, None])
                rgba = np.concatenate([rgb, (valid * 255).astype(np.uint8)[..., None]], axis=-1)
                rgba[~valid] = 0
                dst.write(np.moveaxis(rgba, -1, 0), window=Window(0, row, tile.width, rows.stop - row))
        with atomic_path(cog) as tmp:
            rasterio.shutil.copy(staging, tmp, driver="COG", compress="DEFLATE", predictor=2, blocksize=256,
                                 overview_resampling="average")
            check_raster_complete(tmp)
        # No .aux.xml beside the PNG: it would be left behind under the temporary name.
        with rasterio.Env(GDAL_PAM_ENABLED="NO"), atomic_path(png) as tmp:
            rasterio.shutil.copy(staging, tmp, driver="PNG")
            check_raster_complete(tmp)
