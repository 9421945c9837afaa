"""Assemble of one whole 0.1° tile against GDAL's own speed, on this machine.

    .venv/bin/python benchmarks/assemble.py [--tile grid_6.05_52.05] [--dims 128] [--repeats 3]
        [--scratch DIR] [--keep] [--cog-copy-floor]

Synthesises patch embeddings on disk in the patch layout (``tessera.layout.write_patch_embedding``;
no inference needed) over the whole tile grid, then, ``--repeats`` times, alternating:

- ``tessera assemble --cog`` in a subprocess: wall, CPU (user + sys of the child) and peak RSS;
- the floor: rasterio writes the same dequantised float32 array, from memory, as a tiled
  pixel-interleaved DEFLATE + predictor-3 GTiff: the compression of the full-resolution pixels,
  which any writer of this COG must do (the COG adds a third for its overviews).

Prints medians and assemble / floor. ``--cog-copy-floor`` also times, once, GDAL's COG driver
copying that GTiff to a COG with write_tile_cog's options (the staging route assemble used before:
its time grows with the square of the band count).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

from tessera.grid import Tile
from tessera.layout import Results, WorkTile, patch_name, write_patch_embedding
from tessera.plan import plan_tile
from tessera.roi import read_roi, write_roi_mask

BIN = Path(sys.executable).parent
YEAR = 2024


def synthetic_embedding(height: int, width: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """Spatially smooth fields plus noise: compresses about as a real embedding does (neither constant
    nor white noise)."""
    coarse = rng.normal(0, 1, (height // 32 + 2, width // 32 + 2, dims)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 32, axis=0), 32, axis=1)[:height, :width]
    return smooth + rng.normal(0, 0.3, (height, width, dims)).astype(np.float32)


def synthesise(tile: Tile, roi: str, work: WorkTile, dims: int, patch_size: int) -> list[Path]:
    plan = plan_tile(read_roi(roi), tile, patch_size)
    write_roi_mask(read_roi(roi), tile, work.roi_mask)
    rng = np.random.default_rng(0)
    paths = []
    for patch in plan.patches:
        path = work.patch(patch_name(patch))
        if not path.exists():
            write_patch_embedding(path, synthetic_embedding(patch.height, patch.width, dims, rng))
        paths.append(path)
    return paths


def dequantised(results: Results, tile: Tile) -> np.ndarray:
    """The tile's float32 embedding (bands, rows, cols) as the COG holds it."""
    codes = np.load(results.embedding(tile.name, YEAR), mmap_mode="r")
    scales = np.load(results.scales(tile.name, YEAR))
    return np.moveaxis(codes.astype(np.float32) * scales[..., None], -1, 0)


def gdal_tiled_write(array: np.ndarray, tile: Tile, out: Path) -> float:
    """Seconds for GDAL to write ``array`` as a tiled, pixel-interleaved DEFLATE + predictor-3 GTiff."""
    start = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(
            out, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
            dtype="float32", crs=tile.crs, transform=tile.transform, nodata=float("nan"), tiled=True, blockxsize=256,
            blockysize=256, interleave="pixel", compress="deflate", predictor=3, bigtiff="if_safer") as dst:
        dst.write(array)
    return time.perf_counter() - start


def gdal_cog_copy(staging: Path, out: Path) -> float:
    """Seconds for GDAL's COG driver to copy a tiled GTiff to a COG with write_tile_cog's options."""
    start = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=256):
        rasterio.shutil.copy(staging, out, driver="COG", compress="DEFLATE", predictor=3, blocksize=256,
                             overview_resampling="average", bigtiff="IF_SAFER", num_threads=str(os.cpu_count() or 1))
    return time.perf_counter() - start


def run_assemble(tile: Tile, work_dir: Path, output_dir: Path, patches_dir: Path, checkpoint: Path) -> dict:
    command = [str(BIN / "tessera"), "assemble", "--tile", tile.name, "--year", str(YEAR), "--work-dir", str(work_dir),
               "--output-dir", str(output_dir), "--family", "v2", "--checkpoint", str(checkpoint),
               "--source", "demo", "--cog", str(patches_dir)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed ({status})")
    del before
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", default="grid_6.05_52.05")
    parser.add_argument("--roi", help="default: the tile's cell shrunk by 0.001°")
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", default="/tmp/tessera-bench-assemble")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--cog-copy-floor", action="store_true",
                        help="also time GDAL's COG copy of the tiled GTiff (minutes at 128 bands)")
    args = parser.parse_args()

    tile = Tile.from_name(args.tile)
    west, south, east, north = tile.bounds_lonlat
    roi = args.roi or f"{west + 0.001},{south + 0.001},{east - 0.001},{north - 0.001}"
    scratch = Path(args.scratch)
    work_dir, output_dir = scratch / "work", scratch / "out"
    work = WorkTile.at(work_dir, YEAR, tile.name)
    patches = synthesise(tile, roi, work, args.dims, args.patch_size)
    checkpoint = scratch / "checkpoint.pt"
    checkpoint.write_bytes(b"stand-in checkpoint: assemble only hashes it")
    print(f"tile {tile.name}: {tile.width} x {tile.height} px, {args.dims} dims, {len(patches)} patches "
          f"of <= {args.patch_size} px ({sum(p.stat().st_size for p in patches) / 2**20:.0f} MiB on disk)")

    results = Results(output_dir)
    floors, runs = [], []
    staging = scratch / "floor.staging.tif"
    for repeat in range(args.repeats):
        runs.append(run_assemble(tile, work_dir, output_dir, work.patches, checkpoint))
        floors.append(gdal_tiled_write(dequantised(results, tile), tile, staging))
        print(f"  run {repeat + 1}: assemble {runs[-1]['wall']:.1f} s wall, {runs[-1]['cpu']:.1f} s CPU, "
              f"{runs[-1]['rss_mib']:.0f} MiB peak RSS; GDAL tiled write {floors[-1]:.1f} s", flush=True)
    cog = results.cog(tile.name, YEAR)
    wall = statistics.median(r["wall"] for r in runs)
    floor = statistics.median(floors)
    print(f"assemble (int8 + scales + {args.dims}-band COG, {cog.stat().st_size / 2**20:.0f} MiB): "
          f"{wall:.1f} s wall, {statistics.median(r['cpu'] for r in runs):.1f} s CPU, "
          f"{max(r['rss_mib'] for r in runs):.0f} MiB peak RSS (median of {args.repeats})")
    print(f"floor: GDAL writes the same float32 array as a tiled DEFLATE + predictor-3 GTiff: {floor:.1f} s "
          f"-> assemble / floor {wall / floor:.2f}x")
    if args.cog_copy_floor:
        copy = gdal_cog_copy(staging, scratch / "floor.cog.tif")
        print(f"floor + GDAL's COG copy of that GTiff (overviews made by the COG driver): {floor + copy:.1f} s "
              f"-> assemble / (write + copy) {wall / (floor + copy):.2f}x")
    if not args.keep:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
