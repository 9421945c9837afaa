"""Assemble of one whole 0.1° tile against GDAL's own time to write the same COG, on this machine.

    .venv/bin/python benchmarks/assemble.py [--tile grid_6.05_52.05] [--dims 128] [--repeats 3]
        [--threads N] [--scratch DIR] [--keep]

Synthesises patch embeddings on disk in the patch layout (``tessera.layout.write_patch_embedding``;
no inference needed) over the whole tile grid, then, ``--repeats`` times, in alternating turns:

- ``tessera assemble --cog --threads N`` in a subprocess: wall, CPU (user + sys of the child) and
  peak RSS of the whole stage (start-up and imports included): patches read, int8 codes + scales +
  SHA256 written, the float32 COG with overviews written and checked;
- the floor, also in a subprocess: GDAL writes the same COG from the raw float32 array (the
  dequantised embedding, bands first, a .npy mapped from the page cache) in GDAL's fastest way
  found: a band-interleaved in-memory raster, its average overviews, the COG driver's copy with
  DEFLATE + predictor 3, 256-px blocks and the same NUM_THREADS. Timed from the array in memory to
  the file closed (start-up, imports and the load excluded). Its COG is checked to be assemble's
  COG byte for byte (same band descriptions and tags), so both write the same file.

Prints medians and assemble / floor. (Slower GDAL routes, not the floor: the COG driver making the
overviews itself from a source without them took 111 s where this route took 35 s, 128 numbers a
pixel, same conditions; from a pixel-interleaved in-memory raster GDAL's average overviews took 6
to 8 times as long as from a band-interleaved one.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.enums
import rasterio.shutil

from tessera.assemble import COG_BLOCK, cog_overview_factors, data_window
from tessera.options import available_cpus
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


def write_floor_input(results: Results, tile: Tile, cog: Path, out: Path) -> None:
    """The tile's float32 embedding as the COG holds it, bands first (``out``), and the COG's grid,
    band descriptions and tags (``out`` + .json): what GDAL is given to write the same COG."""
    codes = np.load(results.embedding(tile.name, YEAR), mmap_mode="r")
    scales = np.load(results.scales(tile.name, YEAR), mmap_mode="r")
    window = data_window(scales)  # the rows and columns the COG covers
    codes, scales = codes[window.toslices()], scales[window.toslices()]
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(codes.shape[2], *codes.shape[:2]))
    for row in range(0, codes.shape[0], 64):
        rows = slice(row, row + 64)
        array[:, rows] = np.moveaxis(codes[rows].astype(np.float32) * scales[rows, :, None], -1, 0)
    array.flush()
    with rasterio.open(cog) as src:
        meta = {"crs": src.crs.to_wkt(), "transform": list(src.transform)[:6], "descriptions": list(src.descriptions),
                "tags": src.tags()}
    Path(f"{out}.json").write_text(json.dumps(meta))


def floor_write(array_path: Path, out: Path, threads: int) -> float:
    """Seconds for GDAL to write the float32 array at ``array_path`` as the COG (run in a subprocess)."""
    meta = json.loads(Path(f"{array_path}.json").read_text())
    array = np.load(array_path, mmap_mode="r")  # in the page cache: just written
    dims, height, width = array.shape
    start = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(
            "", "w", driver="MEM", width=width, height=height, count=dims, dtype="float32", crs=meta["crs"],
            transform=rasterio.Affine(*meta["transform"]), nodata=float("nan"), interleave="band") as raster:
        raster.write(array)
        raster.descriptions = tuple(meta["descriptions"])
        raster.update_tags(**meta["tags"])
        raster.build_overviews(cog_overview_factors(width, height), rasterio.enums.Resampling.average)
        rasterio.shutil.copy(raster, out, driver="COG", compress="DEFLATE", predictor=3, blocksize=COG_BLOCK,
                             overview_resampling="average", bigtiff="IF_SAFER", num_threads=str(threads))
    return time.perf_counter() - start


def measured(command: list[str]) -> dict:
    """Run ``command``: its wall time, CPU time (user + sys), peak RSS and standard output."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stdout = process.stdout.read()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed ({status})")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024, "stdout": stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", default="grid_6.05_52.05")
    parser.add_argument("--roi", help="default: the tile's cell shrunk by 0.001°")
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=available_cpus(),
                        help="compression threads of both (default: the CPUs this process may use)")
    parser.add_argument("--scratch", default="/tmp/tessera-bench-assemble")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--floor-only", nargs=2, metavar=("ARRAY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_only:
        print(floor_write(Path(args.floor_only[0]), Path(args.floor_only[1]), args.threads))
        return

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
          f"of <= {args.patch_size} px ({sum(p.stat().st_size for p in patches) / 2**20:.0f} MiB on disk); "
          f"{args.threads} threads, {os.cpu_count()} CPUs", flush=True)

    results = Results(output_dir)
    cog = results.cog(tile.name, YEAR)
    assemble = [str(BIN / "tessera"), "assemble", "--tile", tile.name, "--year", str(YEAR), "--work-dir", str(work_dir),
                "--output-dir", str(output_dir), "--family", "v2", "--checkpoint", str(checkpoint), "--source", "demo",
                "--cog", "--threads", str(args.threads), str(work.patches)]
    floor_input, floor_cog = scratch / "floor.float32.npy", scratch / "floor.cog.tif"
    floor = [sys.executable, __file__, "--threads", str(args.threads), "--floor-only", str(floor_input), str(floor_cog)]
    runs, floors = [], []
    for repeat in range(args.repeats):
        # Both write new files, as Snakemake removes a job's outputs before it runs the job.
        shutil.rmtree(output_dir, ignore_errors=True)
        floor_cog.unlink(missing_ok=True)
        runs.append(measured(assemble))
        if not floor_input.exists():
            write_floor_input(results, tile, cog, floor_input)
        floors.append(measured(floor))
        floors[-1]["write"] = float(floors[-1]["stdout"])
        print(f"  run {repeat + 1}: assemble {runs[-1]['wall']:.1f} s wall, {runs[-1]['cpu']:.1f} s CPU, "
              f"{runs[-1]['rss_mib']:.0f} MiB peak RSS; GDAL's COG from float32 {floors[-1]['write']:.1f} s "
              f"({floors[-1]['cpu']:.1f} s CPU of its process)", flush=True)
    same = floor_cog.read_bytes() == cog.read_bytes()
    wall = statistics.median(r["wall"] for r in runs)
    floor_wall = statistics.median(f["write"] for f in floors)
    print(f"assemble (int8 + scales + {args.dims}-band COG, {cog.stat().st_size / 2**20:.0f} MiB): "
          f"{wall:.1f} s wall, {statistics.median(r['cpu'] for r in runs):.1f} s CPU, "
          f"{max(r['rss_mib'] for r in runs):.0f} MiB peak RSS (median of {args.repeats})")
    print(f"floor: GDAL writes the same COG ({'byte for byte' if same else 'NOT byte for byte'}) from the float32 "
          f"array in memory: {floor_wall:.1f} s -> assemble / floor {wall / floor_wall:.2f}x")
    if not args.keep:
        shutil.rmtree(scratch)
    if not same:
        raise SystemExit("the floor's COG differs from assemble's: the comparison is not of the same file")


if __name__ == "__main__":
    main()
