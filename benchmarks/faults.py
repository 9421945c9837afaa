"""Fault soak: one tile's S2 fetch through the fault proxy of the tests, once per seed, each
compared with a clean fetch. Prints the faults injected, the scenes skipped and whether the stack
is bit-identical to the clean one (the goal: every run identical, nothing skipped).

    .venv/bin/python benchmarks/faults.py [--seeds 10] [--kinds reset,truncate --share 0.1]

Timeouts and retry delays are shortened as in tests/test_faults.py (stalls end after 2 s, the
client gives up after 1 s); what is retried, and how often, is the production setting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tessera.fetch  # noqa: E402
import tessera.fetch.reader  # noqa: E402
import tessera.sources.stac  # noqa: E402
from faults import FAULT_KINDS, FaultPlan, FaultyProxy, proxied  # noqa: E402
from shapely import box  # noqa: E402
from tessera.demo import generate_catalog, serve_catalog  # noqa: E402
from tessera.grid import roi_in_tile, tiles_for_geometry, work_window  # noqa: E402
from tessera.sources.mpc import mpc_shaped_source  # noqa: E402
from tessera.stack import open_s2  # noqa: E402

BBOX = (5.998, 52.040, 6.002, 52.042)
YEAR = 2024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--kinds", default="reset,truncate", help=f"comma-separated, of {','.join(FAULT_KINDS)}")
    parser.add_argument("--share", type=float, default=0.1, help="share of requests that fail")
    args = parser.parse_args()
    tessera.fetch.reader.GDAL_HTTP_OPTIONS.update(GDAL_HTTP_TIMEOUT="1", GDAL_HTTP_RETRY_DELAY="0.1")
    tessera.sources.stac._SEARCH_TIMEOUT_S = (2, 2)
    tile = next(t for t, _ in tiles_for_geometry(box(*BBOX)) if t.epsg == 32632)
    window = work_window(tile, roi_in_tile(tile, box(*BBOX)))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        catalog = generate_catalog(scratch / "demo", YEAR, BBOX, seed=3, s2_revisit_days=60, s1_revisit_days=90)

        def fetch(out: Path, plan: FaultPlan | None):
            # A fresh server per fetch: GDAL's per-process cache never answers for the network.
            with serve_catalog(catalog) as url:
                source = mpc_shaped_source("demo", url, ephemeral_url=True)
                if plan is None:
                    return tessera.fetch.fetch_s2(tile, window, YEAR, source, out, patch_size=16), None
                with FaultyProxy(plan) as proxy, proxied(proxy.url):
                    return tessera.fetch.fetch_s2(tile, window, YEAR, source, out, patch_size=16), proxy

        fetch(scratch / "clean.zarr", None)
        clean = open_s2(scratch / "clean.zarr")
        identical = 0
        for seed in range(args.seeds):
            out = scratch / f"faulty{seed}.zarr"
            plan = FaultPlan(share=args.share, kinds=tuple(args.kinds.split(",")), seed=100 + seed, stall_seconds=2)
            report, proxy = fetch(out, plan)
            faulty = open_s2(out)
            same = (faulty.series.scenes == clean.series.scenes and np.array_equal(faulty.bands[:], clean.bands[:])
                    and np.array_equal(faulty.masks[:], clean.masks[:]))
            identical += same
            print(f"seed {100 + seed}: {dict(proxy.log.faults)} in {len(proxy.log.requests)} requests; "
                  f"{len(report['skipped'])} scenes skipped; identical to the clean stack: {same}", flush=True)
        print(f"{identical} of {args.seeds} runs identical to the clean fetch")


if __name__ == "__main__":
    main()
