"""A tile's fetch CPU against its floors (plain decodes of the same blocks; GDAL's warp of the same COGs), in one process.

    .venv/bin/python benchmarks/fetch_floor.py --catalog-work-dir WORK [--tile grid_6.05_52.05] [--year 2024]
        [--scratch DIR] [--repeats 3]

For a demo catalog made already (``<WORK>/demo/<year>/catalog.json``, e.g. left by
``benchmarks/fulltile.py --keep``): runs the fetch sub-command in this process over the tile (ROI:
the tile shrunk by 0.001°, as fulltile.py), so that its CPU (``RUSAGE_SELF``) leaves out the demo's
STAC server, a child process; then measures the floor ``--repeats`` times (fulltile.py's
``decode_floor``: each COG the fetch read opened once, its blocks under the work window decoded
once, no warp) and the warp floor (fulltile.py's ``warp_floor``: the same COGs warped onto the work
window from local disk by the fetch's own warp, one after the other), and prints the fetch's CPU as
a multiple of each median floor.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fulltile import decode_floor, warp_floor

from tessera.cli import main as tessera_main
from tessera.grid import Tile
from tessera.layout import WorkTile, demo_catalog


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog-work-dir", type=Path, required=True, help="work dir holding demo/<year>/catalog.json")
    parser.add_argument("--tile", default="grid_6.05_52.05")
    parser.add_argument("--year", type=int, default=2024)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tile = Tile.from_name(args.tile)
    west, south, east, north = tile.bounds_lonlat
    roi = f"{west + 0.001},{south + 0.001},{east - 0.001},{north - 0.001}"
    scratch = Path(tempfile.mkdtemp(prefix="fetch-floor-", dir=args.scratch))
    work_dir = scratch / "work"
    catalog = demo_catalog(work_dir, args.year).parent
    catalog.parent.mkdir(parents=True)
    catalog.symlink_to(demo_catalog(args.catalog_work_dir, args.year).parent.resolve())
    argv = ["-q", "fetch", "--tile", tile.name, "--year", str(args.year), "--work-dir", str(work_dir), "--output-dir",
            str(scratch / "results"), "--roi", roi, "--source", "demo", "--patch-size", "512"]
    started, wall = cpu_seconds(), time.perf_counter()
    sys.argv = ["tessera", *argv]
    try:
        tessera_main()
    except SystemExit as exit:
        if exit.code:
            raise
    fetch_cpu, wall = cpu_seconds() - started, time.perf_counter() - wall
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    work = WorkTile.at(work_dir, args.year, tile.name)
    floors, warps = [], []
    for _ in range(args.repeats):
        floor, reads, pixels = decode_floor(work, catalog, tile, repeats=1)
        floors.append(floor)
        warps.append(warp_floor(work, catalog, tile, repeats=1))
    floor, warped = statistics.median(floors), statistics.median(warps)
    print(f"{tile.name} {args.year}: fetch (without the demo server) {wall:.1f} s wall, {fetch_cpu:.1f} s CPU, "
          f"peak {peak_mib:.0f} MiB; decode floor: {reads} COGs, {pixels / 1e6:.0f} M px, {floor:.1f} s CPU (median of "
          f"{', '.join(f'{f:.1f}' for f in floors)}); warp floor: {warped:.1f} s CPU (median of "
          f"{', '.join(f'{f:.1f}' for f in warps)}) = {warped / floor:.2f}x the decode floor -> fetch = "
          f"{fetch_cpu / floor:.2f}x the decode floor, {fetch_cpu / warped:.2f}x the warp floor")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
