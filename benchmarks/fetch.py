"""Bytes a fetch downloads against the bytes it needs, and how long it takes, on the offline demo.

Every tile of the config's ROI is fetched (S2 and S1) from the demo STAC API. GDAL's own network
statistics give the bytes each COG sent; each COG's block index gives the bytes of its
full-resolution blocks that intersect the tile's work window, which any reader of the window has
to fetch. Target: fetched / needed <= 1.3.

    .venv/bin/python benchmarks/fetch.py [--config config/demo.yaml] [--parallel-reads 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# GDAL reads this once, when it first touches the network.
os.environ["CPL_VSIL_NETWORK_STATS_ENABLED"] = "YES"

import rasterio  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from tessera import config as tessera_config  # noqa: E402
from tessera.demo import generate_catalog, serve_catalog  # noqa: E402
from tessera.fetch import PARALLEL_READS, fetch_s1, fetch_s2  # noqa: E402
from tessera.grid import reproject  # noqa: E402
from tessera.plan import make_plan  # noqa: E402
from tessera.roi import read_roi  # noqa: E402
from tessera.sources.mpc import mpc_shaped_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class NetworkStats:
    """GDAL's per-file network statistics (VSINetworkStats*, which rasterio does not wrap)."""

    def __init__(self):
        libraries = Path(rasterio.__file__).parent.parent / "rasterio.libs"
        self._gdal = ctypes.CDLL(str(next(libraries.glob("libgdal*.so*"))))
        self._gdal.VSINetworkStatsGetAsSerializedJSON.restype = ctypes.c_void_p
        self._gdal.VSIFree.argtypes = [ctypes.c_void_p]

    def reset(self) -> None:
        self._gdal.VSINetworkStatsReset()

    def per_file(self) -> dict[str, tuple[int, int]]:
        """/vsicurl/ URL -> (requests, bytes downloaded)."""
        pointer = self._gdal.VSINetworkStatsGetAsSerializedJSON(None)
        stats = json.loads(ctypes.string_at(pointer).decode())
        self._gdal.VSIFree(pointer)
        files = stats.get("handlers", {}).get("vsicurl", {}).get("files", {})
        result = {}
        for url, entry in files.items():
            methods = entry.get("methods", {})
            requests = sum(m.get("count", 0) for m in methods.values())
            result[url] = (requests, sum(m.get("downloaded_bytes", 0) for m in methods.values()))
        return result


def needed_bytes(cog: Path, tile, window: Window) -> int:
    """Bytes of the full-resolution blocks of ``cog`` that intersect the work window."""
    with rasterio.open(cog) as src:
        footprint = reproject(tile.pixel_box(window), tile.epsg, src.crs.to_epsg(), densify=10.0)
        west, south, east, north = footprint.bounds
        col_start, row_start = ~src.transform * (west, north)
        col_stop, row_stop = ~src.transform * (east, south)
        block_height, block_width = src.block_shapes[0]
        rows = range(max(0, math.floor(row_start) // block_height), min(src.height - 1, math.ceil(row_stop) - 1) // block_height + 1)
        cols = range(max(0, math.floor(col_start) // block_width), min(src.width - 1, math.ceil(col_stop) - 1) // block_width + 1)
        return sum(src.block_size(1, row, col) for row in rows for col in cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config/demo.yaml"))
    parser.add_argument("--parallel-reads", type=int, default=PARALLEL_READS)
    parser.add_argument("--keep", help="work in this directory and keep it")
    args = parser.parse_args()

    cfg = tessera_config.load([args.config])
    if cfg["source"] != "demo":
        sys.exit("benchmarks/fetch.py measures the demo source: give a config with source: demo")
    plan = make_plan(cfg)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tessera-fetch-bench-"))
    catalog = workdir / "catalog" / "catalog.json"
    if not catalog.exists():
        generate_catalog(catalog.parent, cfg["year"], read_roi(cfg["roi"]).bounds,
                         s2_revisit_days=cfg["demo"]["s2_revisit_days"], s1_revisit_days=cfg["demo"]["s1_revisit_days"])
    stats = NetworkStats()
    print(f"demo {cfg['roi']} {cfg['year']}, {args.parallel_reads} parallel reads ({workdir})")
    print(f"{'tile':<16} {'sensor':<6} {'dates':>5} {'s':>6} {'COGs':>5} {'requests':>8} {'fetched KB':>10} "
          f"{'needed KB':>9} {'ratio':>6}")
    totals = {"fetched": 0, "needed": 0, "seconds": 0.0}
    with serve_catalog(catalog) as url:
        source = mpc_shaped_source("demo", url, ephemeral_url=True)
        for planned in plan.tiles:
            for sensor, fetcher in (("s2", fetch_s2), ("s1", fetch_s1)):
                out = workdir / "work" / planned.tile.name / f"{sensor}.zarr"
                stats.reset()
                start = time.perf_counter()
                report = fetcher(planned.tile, planned.window, cfg["year"], source, out,
                                 search_cache=out.with_name(f"search_{sensor}.json"), patch_size=cfg["patch_size"],
                                 parallel_reads=args.parallel_reads)
                seconds = time.perf_counter() - start
                files = {u: v for u, v in stats.per_file().items() if u.endswith(".tif")}
                fetched = sum(downloaded for _, downloaded in files.values())
                needed = sum(needed_bytes(catalog.parent / u.split(url, 1)[1], planned.tile, planned.window)
                             for u in files)
                requests = sum(count for count, _ in files.values())
                totals["fetched"] += fetched
                totals["needed"] += needed
                totals["seconds"] += seconds
                print(f"{planned.tile.name:<16} {sensor:<6} {len(report['kept']):>5} {seconds:>6.1f} {len(files):>5} "
                      f"{requests:>8} {fetched / 1e3:>10.1f} {needed / 1e3:>9.1f} {fetched / max(needed, 1):>6.2f}")
    print(f"all: {totals['seconds']:.1f} s, fetched {totals['fetched'] / 1e6:.2f} MB for {totals['needed'] / 1e6:.2f} MB "
          f"of intersecting blocks: {totals['fetched'] / max(totals['needed'], 1):.2f}x")


if __name__ == "__main__":
    main()
