"""One whole 0.1° tile through every stage, with a year of demo scenes, on this machine.

    .venv/bin/python benchmarks/fulltile.py [--tile grid_6.05_52.05] [--year 2024] [--patch-size 512]
        [--s2-revisit-days 5] [--s1-revisit-days 12] [--scratch DIR] [--keep] [--no-forward]
        [--infer-patch-sizes 256,1024] [--checkpoint-size tiny]

Runs the stages' own sub-commands in subprocesses, one after the other, as the rules run them:
``tessera demo catalog``, ``tessera demo checkpoint`` (a v2 demo checkpoint of ``--checkpoint-size``),
``tessera fetch``, ``tessera infer``, ``tessera assemble --cog``, ``tessera publish``. Per stage: wall,
CPU (user + sys of the process and the children it waited for, from wait4), peak RSS (the largest
single process),
bytes read and written by the stage's processes (the read_chars / write_chars of their /proc I/O
counters, sampled every 0.2 s, so files and sockets both count), and for fetch the bytes the demo's
local STAC API sent (the source's side of the connection). The stage's outputs' bytes on disk are
printed too.

The fetch's CPU without the demo's STAC server is then compared with a floor measured in the same
run: plain reads (no warp) that open each COG the fetch read once and decode its blocks under the
work window once (``decode_floor``), and with a second floor: GDAL alone warping the same COGs
from local disk onto the work window with the fetch's own warp and resampling (``warp_floor``).
With ``--infer-patch-sizes``, the first patch of each size is inferred again from the same stacks,
for its peak RSS.

The ROI is the tile's cell shrunk by 0.001° (the whole tile's pixel grid but a thin border). For a
quick check, thin the year out with --s2-revisit-days 30 --s1-revisit-days 60 (figures for README
come from the defaults: a full year).

The infer stage uses the v2 demo size ``tiny`` by default (1 layer, latent 8; still 128 numbers per
pixel): at the published small size, inference of a tile takes over an hour on a 2-core CPU (README
"One tile, stage by stage") and would dominate every other stage. The infer figures (the stage's and
the one-patch peak RSS) are then the tiny model's, not a real inference's: unless --no-forward,
benchmarks/infer.py measures the published-size v2 ("small") forward and end-to-end px/s in the same
run, and the inference of the same tile with a real v2 checkpoint on this CPU is extrapolated from
the tile's ROI pixel count. (``--checkpoint-size small`` infers the tile at the published size.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tree_bytes(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


class IoSampler:
    """The last I/O counters seen of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.counters: dict[int, tuple[str, int, int, float]] = {}  # pid -> (command, read_chars, write_chars, CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for process in processes:
                try:
                    io, cpu = process.io_counters(), process.cpu_times()
                    self.counters[process.pid] = (" ".join(process.cmdline()), io.read_chars, io.write_chars,
                                                  cpu.user + cpu.system)
                except psutil.Error:
                    continue
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def totals(self, *, server: bool) -> tuple[int, int, float]:
        """(read, written, CPU seconds) of the demo's STAC server processes (``server``) or of all the others."""
        chosen = [(r, w, c) for command, r, w, c in self.counters.values() if ("uvicorn" in command) == server]
        return tuple(sum(column) for column in zip(*chosen)) if chosen else (0, 0, 0.0)


def run_stage(name: str, command: list[str], outputs: list[Path], env: dict) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    sampler = IoSampler(process.pid)
    stderr_lines = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    sampler.stop()
    reader.join()
    process.returncode = status
    if status != 0:
        sys.stderr.write("".join(stderr_lines[-30:]))
        raise SystemExit(f"stage {name} failed: {' '.join(command)}")
    read, written, _ = sampler.totals(server=False)
    _, served, server_cpu = sampler.totals(server=True)
    return {"stage": name, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
            "read": read, "written": written, "served": served, "server_cpu": server_cpu,
            "outputs": tree_bytes(outputs)}


def infer_one_patch(size: int, tile, year: int, roi: str, work, checkpoint: Path, scratch: Path, env: dict) -> dict:
    """The infer stage for the first patch of ``size`` px, from the tile's stacks, in a work folder of its
    own (links to the stacks, stack index and ROI mask) so that its patch does not join the tile's."""
    from tessera.layout import WorkTile, patch_name
    from tessera.plan import plan_tile
    from tessera.roi import read_roi

    work_dir = scratch / f"work-patch-{size}"
    own = WorkTile.at(work_dir, year, tile.name)
    own.root.mkdir(parents=True, exist_ok=True)
    for path in (work.s2, work.s1, work.stack_index, work.roi_mask):
        (own.root / path.name).symlink_to(path)
    command = [str(BIN / "tessera"), "infer", "--tile", tile.name, "--year", str(year), "--work-dir", str(work_dir),
               "--roi", roi, "--patch-size", str(size), "--patch", patch_name(plan_tile(read_roi(roi), tile, size).patches[0]),
               "--checkpoint", str(checkpoint), "--family", "v2"]
    return run_stage(f"infer 1 patch {size}", command, [own.patches], env)


def needed_blocks(src, area, area_epsg: int):
    """The window of ``src`` that covers ``area`` (a polygon in ``area_epsg``) with one source pixel
    to spare for the resampling kernel, out to whole blocks: what any reader of the area decodes."""
    from rasterio.windows import Window

    from tessera.grid import reproject

    west, south, east, north = reproject(area, area_epsg, src.crs.to_epsg(), densify=10.0).bounds
    col_start, row_start = ~src.transform * (west, north)
    col_stop, row_stop = ~src.transform * (east, south)
    block_height, block_width = src.block_shapes[0]
    row_start = max(0, math.floor(row_start) - 1) // block_height * block_height
    col_start = max(0, math.floor(col_start) - 1) // block_width * block_width
    row_stop = min(src.height, -(-(math.ceil(row_stop) + 1) // block_height) * block_height)
    col_stop = min(src.width, -(-(math.ceil(col_stop) + 1) // block_width) * block_width)
    return Window(col_start, row_start, col_stop - col_start, row_stop - row_start)


def fetch_reads(work, catalog_dir: Path) -> list[tuple[Path, str]]:
    """The COGs the fetch read, as local files, each with the resampling the fetch warped it with:
    the SCL of every S2 scene it searched (but those of 100 % cloud), the bands of the scenes of
    every date it kept, the VV and VH of every S1 scene. (The fetch skips the bands of a granule
    that gives a kept date no pixel: the floors are then a little high, never low.)"""
    import zarr

    from tessera.fetch import S2_MAX_CLOUD_PCT
    from tessera.period import S1_ORBIT_DIRECTIONS, orbit_of
    from tessera.sources import S1_POLARISATIONS, S2_BANDS, S2_SCL
    from tessera.sources.mpc import mpc_shaped_source

    s2 = zarr.open_group(work.s2, mode="r").attrs
    kept = {scene for scenes in s2["scenes"] for scene in scenes}
    resampling = {S2_SCL: "nearest", **dict.fromkeys(S2_BANDS, s2["preprocessing"]["s2_resampling"]),
                  # the demo source is MPC-shaped: its S1 is resampled as the reference resamples MPC's
                  **dict.fromkeys(S1_POLARISATIONS, mpc_shaped_source("demo", "http://localhost/").s1_resampling)}
    reads = []
    for sensor in ("s2", "s1"):
        cache = json.loads(work.search(sensor).read_text())
        api_url = cache["tessera:api_url"]
        for feature in cache["features"]:
            properties = feature["properties"]
            if sensor == "s2":
                if properties.get("eo:cloud_cover", 0.0) >= S2_MAX_CLOUD_PCT:
                    continue
                assets = [S2_SCL, *S2_BANDS] if feature["id"] in kept else [S2_SCL]
            else:
                if orbit_of(properties) not in S1_ORBIT_DIRECTIONS:
                    continue
                assets = list(S1_POLARISATIONS)
            reads += [(catalog_dir / feature["assets"][asset]["href"][len(api_url):], resampling[asset])
                      for asset in assets]
    return reads


def decode_floor(work, catalog_dir: Path, tile, repeats: int = 3) -> tuple[float, int, int]:
    """(CPU seconds, reads, decoded pixels) of plain reads of the blocks the fetch needs: each COG
    the fetch read opened once and its blocks under the tile's work window decoded once, with no
    warp, in this process (GDAL single-threaded); the median of ``repeats``."""
    import rasterio
    import zarr
    from rasterio.windows import Window

    area = tile.pixel_box(Window(*zarr.open_group(work.s2, mode="r").attrs["window"]))
    reads = fetch_reads(work, catalog_dir)
    seconds, pixels = [], 0
    for _ in range(repeats):
        pixels = 0
        start = time.process_time()
        for path, _ in reads:
            with rasterio.open(path) as src:
                pixels += src.read(1, window=needed_blocks(src, area, tile.epsg)).size
        seconds.append(time.process_time() - start)
    return statistics.median(seconds), len(reads), pixels


def warp_floor(work, catalog_dir: Path, tile, repeats: int = 3) -> float:
    """CPU seconds of GDAL alone warping what the fetch warps: each COG the fetch read opened once
    from local disk and warped onto the work window by the fetch's own warp (``warp_onto``, with
    the fetch's resampling), one after the other in this process: no HTTP, no threads, no encoding,
    no stacks. The median of ``repeats``."""
    import rasterio
    import zarr
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from tessera.fetch.reader import warp_onto

    window = Window(*zarr.open_group(work.s2, mode="r").attrs["window"])
    grid = (f"EPSG:{tile.epsg}", tile.window_transform(window), int(window.width), int(window.height))
    reads = fetch_reads(work, catalog_dir)
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        for path, resampling in reads:
            with rasterio.open(path) as src:
                warp_onto(src, *grid, Resampling[resampling])
        seconds.append(time.process_time() - start)
    return statistics.median(seconds)


def forward_rates() -> tuple[float, float, str]:
    """v2 (published small) forward and end-to-end px/s from benchmarks/infer.py, and its output."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/infer.py"), "--families", "v2", "--no-precision",
                             "--repeats", "5"], capture_output=True, text=True, check=True)
    row = next(line for line in result.stdout.splitlines() if line.startswith("v2 "))
    fields = row.split()
    return float(fields[3]), float(fields[4]), result.stdout


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", default="grid_6.05_52.05")
    parser.add_argument("--year", type=int, default=2024)
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--s2-revisit-days", type=int, default=5)
    parser.add_argument("--s1-revisit-days", type=int, default=12)
    parser.add_argument("--scratch", default="/tmp/tessera-bench-fulltile")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (rerun: stages start afresh)")
    parser.add_argument("--no-forward", action="store_true", help="skip the v2 forward-speed measurement")
    parser.add_argument("--infer-patch-sizes", default="256,1024",
                        help="then infer the first patch of each of these sizes from the same stacks, for its peak "
                             "RSS (patches of a tile are inferred one after the other: one patch is the peak)")
    parser.add_argument("--checkpoint-size", default="tiny",
                        help="the v2 demo checkpoint's size (tessera demo checkpoint --size): tiny (default), so that "
                             "CPU inference does not dominate, or small, the published small size")
    args = parser.parse_args()

    from tessera.grid import Tile
    from tessera.layout import Results, WorkTile, demo_catalog, demo_checkpoint
    from tessera.roi import read_roi_mask

    tile = Tile.from_name(args.tile)
    west, south, east, north = tile.bounds_lonlat
    roi = f"{west + 0.001},{south + 0.001},{east - 0.001},{north - 0.001}"
    scratch = Path(args.scratch)
    if scratch.exists():
        shutil.rmtree(scratch)
    work_dir, output_dir = scratch / "work", scratch / "results"
    work, results = WorkTile.at(work_dir, args.year, tile.name), Results(output_dir)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    tessera = str(BIN / "tessera")
    tile_year = ["--tile", tile.name, "--year", str(args.year), "--work-dir", str(work_dir)]
    checkpoint = demo_checkpoint(work_dir, "v2")
    stages = [
        ("demo catalog", [tessera, "demo", "catalog", "--roi", roi, "--year", str(args.year), "--work-dir", str(work_dir),
                          "--s2-revisit-days", str(args.s2_revisit_days), "--s1-revisit-days", str(args.s1_revisit_days)],
         [demo_catalog(work_dir, args.year).parent]),
        ("demo checkpoint", [tessera, "demo", "checkpoint", "--family", "v2", "--size", args.checkpoint_size,
                             "--work-dir", str(work_dir)], [checkpoint]),
        ("fetch", [tessera, "fetch", *tile_year, "--output-dir", str(output_dir), "--roi", roi, "--source", "demo",
                   "--patch-size", str(args.patch_size)],
         [work.s2, work.s1, work.roi_mask, work.stack_index, results.observations(tile.name, args.year)]),
        ("infer", [tessera, "infer", *tile_year, "--roi", roi, "--patch-size", str(args.patch_size),
                   "--checkpoint", str(checkpoint), "--family", "v2"], [work.patches]),
        ("assemble", [tessera, "assemble", *tile_year, "--output-dir", str(output_dir), "--family", "v2",
                      "--checkpoint", str(checkpoint), "--source", "demo", "--cog", str(work.patches)],
         [results.tile_folder(tile.name, args.year), results.landmask(tile.name), results.cog(tile.name, args.year)]),
        ("publish", [tessera, "publish", "--output-dir", str(output_dir), "--work-dir", str(work_dir), "--family", "v2",
                     "--variant", "demo", "--checkpoint", str(checkpoint), "--source", "demo", "--mosaics",
                     str(results.embedding(tile.name, args.year))],
         [results.manifest, results.quicklooks(args.year), results.stac, results.report,
          output_dir / "mosaic", results.zarr_store]),
    ]
    print(f"{tile.name} {args.year}, ROI {roi}: {tile.width} x {tile.height} px; S2 every {args.s2_revisit_days} d, "
          f"S1 every {args.s1_revisit_days} d; patches of {args.patch_size}; v2 demo checkpoint of size "
          f"{args.checkpoint_size}", flush=True)
    rows = []
    for name, command, outputs in stages:
        rows.append(run_stage(name, command, outputs, env))
        row = rows[-1]
        print(f"  {name}: {row['wall']:.1f} s wall, {row['cpu']:.1f} s CPU, {row['rss_mib']:.0f} MiB", flush=True)

    for size in [int(size) for size in args.infer_patch_sizes.split(",") if size]:
        rows.append(infer_one_patch(size, tile, args.year, roi, work, checkpoint, scratch, env))
        print(f"  {rows[-1]['stage']}: {rows[-1]['wall']:.1f} s wall, {rows[-1]['rss_mib']:.0f} MiB", flush=True)

    import zarr
    s2 = zarr.open_group(work.s2, mode="r")
    dates = s2["bands"].shape[0]
    passes = sum(zarr.open_group(work.s1, mode="r")[orbit]["sar"].shape[0] for orbit in ("ascending", "descending"))
    roi_pixels = int(read_roi_mask(work.roi_mask).sum())
    mib = 2**20
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"tile {tile.name}: {tile.width} x {tile.height} px, {roi_pixels:,} ROI px; {dates} S2 dates, "
          f"{passes} S1 passes")
    print(f"{'stage':<16} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9} {'read MiB':>9} {'written MiB':>12} "
          f"{'outputs MiB':>12} {'source MiB':>11}")
    for row in rows:
        source = f"{row['served'] / mib:11.1f}" if row["served"] else f"{'-':>11}"
        print(f"{row['stage']:<16} {row['wall']:8.1f} {row['cpu']:8.1f} {row['rss_mib']:9.0f} {row['read'] / mib:9.1f} "
              f"{row['written'] / mib:12.1f} {row['outputs'] / mib:12.1f} {source}")
    by_name = {row["stage"]: row for row in rows}
    fetch = by_name["fetch"]
    print(f"fetch per date: {fetch['wall'] / (dates + passes):.2f} s wall, "
          f"{fetch['cpu'] / (dates + passes):.2f} s CPU per S2 date or S1 pass")
    catalog_dir = demo_catalog(work_dir, args.year).parent
    floor, reads, pixels = decode_floor(work, catalog_dir, tile)
    warped = warp_floor(work, catalog_dir, tile)
    client_cpu = fetch["cpu"] - fetch["server_cpu"]
    print(f"fetch CPU without the demo server's ({fetch['server_cpu']:.1f} s): {client_cpu:.1f} s; plain decode of the "
          f"same blocks ({reads} COGs opened once, {pixels / 1e6:.0f} M px, no warp, median of 3): {floor:.1f} s CPU "
          f"-> fetch = {client_cpu / floor:.2f}x the decode floor; GDAL warping the same COGs onto the tile from "
          f"local disk (the fetch's warp alone, median of 3): {warped:.1f} s CPU = {warped / floor:.2f}x the decode "
          f"floor -> fetch = {client_cpu / warped:.2f}x the warp floor")
    infer = by_name["infer"]
    print(f"infer (v2 demo checkpoint, size {args.checkpoint_size}): {roi_pixels / infer['wall']:,.0f} px/s wall, "
          f"{roi_pixels / infer['cpu']:,.0f} px per CPU-s")
    if not args.no_forward:
        forward, end_to_end, _ = forward_rates()
        print(f"v2 published size (benchmarks/infer.py, this run): forward {forward:.1f} px/s, end-to-end "
              f"{end_to_end:.1f} px/s -> a real v2 inference of this tile's {roi_pixels:,} px on this CPU: "
              f"{roi_pixels / end_to_end / 3600:.1f} h (forward alone {roi_pixels / forward / 3600:.1f} h)")
    if not args.keep:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
