"""Dry-run time and peak memory of the Snakemake DAG for ROIs of 10, 100, 1,000 and 5,000 tiles.

    .venv/bin/python benchmarks/dag.py [--tiles 10 100 1000 5000] [--patch-size 512]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def roi_for(tiles: int) -> str:
    """A bbox of about `tiles` whole 0.1° cells in Western Europe."""
    cols = math.ceil(math.sqrt(tiles))
    rows = math.ceil(tiles / cols)
    return f"0.0,45.0,{cols / 10:.1f},{45 + rows / 10:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--patch-size", type=int, default=512)
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    print(f"{'tiles':>6} {'jobs':>7} {'dry-run s':>10} {'peak MiB':>9}")
    for tiles in args.tiles:
        with tempfile.TemporaryDirectory() as workdir:
            config = Path(workdir) / "c.yaml"
            config.write_text(yaml.safe_dump({"roi": roi_for(tiles), "year": 2024, "patch_size": args.patch_size,
                                              "max_tiles": 10 * tiles}))
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            result = subprocess.run(
                [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", workdir, "-n", "-q", "rules",
                 "--configfile", str(config), "--cores", "1"], capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if result.returncode != 0:
                sys.exit(result.stderr[-2000:])
            total = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("total"))
            # ru_maxrss of children is the largest child so far: report it when it grew.
            print(f"{tiles:>6} {total:>7} {seconds:>10.1f} {max(peak, before) / 1024:>9.0f}")


if __name__ == "__main__":
    main()
