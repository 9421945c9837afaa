"""Run the offline demo in a scratch directory and print, per stage: wall time and peak memory
(from Snakemake's benchmark files), and the stacks' bytes on disk against the raw .npy bytes of the
reference per-patch layout for the same data.

    .venv/bin/python benchmarks/demo.py [--config config/demo.yaml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import zarr

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def reference_npy_bytes(store: Path) -> int:
    """Bytes the reference layout (bands.npy, masks.npy, sar_*.npy, doys) needs for the same arrays."""
    group = zarr.open_group(store, mode="r")
    total = 0
    for _, array in group.arrays():
        total += array.nbytes + 128  # + the .npy header
    for _, sub in group.groups():
        for _, array in sub.arrays():
            total += array.nbytes + 128
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config/demo.yaml"))
    parser.add_argument("--keep", help="run in this directory and keep it")
    parser.add_argument("--cores", default="2")
    args = parser.parse_args()

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                    "--configfile", args.config, "--cores", args.cores, "-q"], check=True, env=env)
    wall = time.perf_counter() - start

    per_rule: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for tsv in (workdir / "logs/benchmarks").rglob("*.tsv"):
        # logs/benchmarks/<rule>/<job>.tsv per tile or patch, logs/benchmarks/<rule>.tsv once per run
        relative = tsv.relative_to(workdir / "logs/benchmarks")
        rule = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        with tsv.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        rss = float(row["max_rss"]) if row["max_rss"] not in ("-", "NA", "") else float("nan")
        per_rule[rule].append((float(row["s"]), rss))

    print(f"demo end to end: {wall:.1f} s wall on {args.cores} cores ({workdir})")
    print(f"{'stage':<16} {'jobs':>5} {'sum s':>9} {'max s':>8} {'peak MiB':>9}")
    for rule in ["demo_catalog", "demo_checkpoint", "fetch", "infer", "assemble", "publish"]:
        runs = per_rule.get(rule)
        if not runs:
            continue
        print(f"{rule:<16} {len(runs):>5} {sum(s for s, _ in runs):>9.1f} {max(s for s, _ in runs):>8.1f} "
              f"{max(m for _, m in runs):>9.0f}")

    stacks = sorted(workdir.glob("work/*/grid_*/s[12].zarr"))
    on_disk = sum(tree_bytes(s) for s in stacks)
    raw = sum(reference_npy_bytes(s) for s in stacks)
    print(f"stacks: {len(stacks)} stores, {on_disk / 2**20:.2f} MiB on disk vs {raw / 2**20:.2f} MiB as reference "
          f".npy ({raw / max(on_disk, 1):.1f}x smaller)")


if __name__ == "__main__":
    main()
