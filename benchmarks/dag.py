"""Dry-run time and peak memory of our Snakemake DAG, against Snakemake's own floor, measured in turns.

    .venv/bin/python benchmarks/dag.py [--tiles 10 100 1000] [--years 2024] [--repeats 3] [--patch-size 512]

The floor is a Snakefile written here with the same shape as ours for the same config: the same
rules (three per-tile-year jobs chained through the same outputs, then one run-level job and `all`),
the same outputs, logs, benchmarks, params strings, threads, `attempt`-scaled resource lambdas and
wildcard constraints, and the same tile list, but trivial: no imports, no config validation or plan, no input functions,
shell `true`. What our dry-run takes beyond it is what our parse, rules and functions add. The two
dry-runs alternate and each figure is the median of ``--repeats`` runs, so that other load on the
machine falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

from tessera import config as tessera_config  # noqa: E402
from tessera.plan import make_plan  # noqa: E402

FLOOR = '''
import json
TILES = json.load(open(config["tiles_json"]))
YEARS = config["years"]
W = "work/{year}/{tile}"
R = "results"


wildcard_constraints:
    tile=r"grid_-?\d+\.\d5_-?\d+\.\d5",
    year=r"\d{4}",


def grows(base):
    return lambda wildcards, attempt: base * attempt


rule all:
    input:
        expand(R + "/global_0.1_degree_representation/{year}/{tile}/{tile}.npy", tile=TILES, year=YEARS),
        R + "/tessera_metadata.json",


rule fetch:
    output:
        roi_mask=W + "/roi.tif", s2=directory(W + "/s2.zarr"), s1=directory(W + "/s1.zarr"),
        index=W + "/stack.json", observations=R + "/observations/{year}/{tile}_{year}.tif",
    params: source="--source mpc", options="--min-coverage-pct 0.01 --min-scenes 1"
    resources: mem_mb=grows(2000), runtime=grows(240)
    log: "logs/fetch/{year}/{tile}.log"
    benchmark: "logs/benchmarks/fetch/{year}/{tile}.tsv"
    shell: "true"


rule infer:
    input: index=W + "/stack.json", roi_mask=W + "/roi.tif", checkpoint=config["checkpoint"]
    output: directory(W + "/patches")
    params: patches="", family="v2", options="--device auto"
    threads: 4
    resources: mem_mb=grows(8000), runtime=grows(60), gpu=1
    log: "logs/infer/{year}/{tile}.log"
    benchmark: "logs/benchmarks/infer/{year}/{tile}.tsv"
    shell: "true"


rule assemble:
    input: patches=W + "/patches", roi_mask=W + "/roi.tif", checkpoint=config["checkpoint"]
    output:
        embedding=R + "/global_0.1_degree_representation/{year}/{tile}/{tile}.npy",
        scales=R + "/global_0.1_degree_representation/{year}/{tile}/{tile}_scales.npy",
        checksums=R + "/global_0.1_degree_representation/{year}/{tile}/SHA256",
        cog=[R + "/cog/{year}/{tile}_{year}.tif"], float32=[],
    params: options="--family v2 --source mpc --cog"
    resources: mem_mb=grows(2000), runtime=grows(30)
    log: "logs/assemble/{year}/{tile}.log"
    benchmark: "logs/benchmarks/assemble/{year}/{tile}.tsv"
    shell: "true"


rule publish:
    input:
        embeddings=expand(R + "/global_0.1_degree_representation/{year}/{tile}/{tile}.npy", tile=TILES, year=YEARS),
        checkpoint=config["checkpoint"],
    output: R + "/tessera_metadata.json"
    params: options="--family v2 --variant local --source mpc --mosaics"
    threads: 2
    resources: mem_mb=grows(4000), runtime=grows(20)
    log: "logs/publish.log"
    benchmark: "logs/benchmarks/publish.tsv"
    shell: "true"
'''


def roi_for(tiles: int) -> str:
    """A bbox of about `tiles` whole 0.1° cells in Western Europe."""
    cols = math.ceil(math.sqrt(tiles))
    rows = math.ceil(tiles / cols)
    return f"0.0,45.0,{cols / 10:.1f},{45 + rows / 10:.1f}"


def dry_run(snakefile: Path, workdir: Path, config: Path, env: dict, *extra: str) -> tuple[float, int, int]:
    """(seconds, jobs, peak RSS in KiB) of one `snakemake -n`."""
    start = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(snakefile), "-d", str(workdir), "-n", "-q", "rules",
         "--configfile", str(config), "--cores", "1", *extra], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    jobs = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("total"))
    return seconds, jobs, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--years", type=int, nargs="+", default=[2024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=0,
                        help="also time the preview of the first of N parts (--batch all=1/N): a country in parts")
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    print(f"years {', '.join(map(str, args.years))}")
    batch_column = f" {f'1/{args.batches} s':>8}" if args.batches else ""
    print(f"{'tiles':>6} {'jobs':>6} {'ours s':>8} {'floor s':>8} {'ratio':>6} {'ours MiB':>9}{batch_column}"
          f"   (medians of {args.repeats})")
    for tiles in args.tiles:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            settings = {"roi": roi_for(tiles), "year": args.years, "source": "mpc", "patch_size": args.patch_size,
                        "max_tiles": 10 * tiles, "model": {"checkpoint": str(scratch / "model.pt")}}
            (scratch / "model.pt").write_bytes(b"")
            config = scratch / "c.yaml"
            config.write_text(yaml.safe_dump(settings))
            plan = make_plan(tessera_config.load([REPO / "config/config.yaml", config]))
            (scratch / "tiles.json").write_text(json.dumps([t.name for t in plan.tiles]))
            floor_config = scratch / "floor.yaml"
            floor_config.write_text(yaml.safe_dump({"tiles_json": str(scratch / "tiles.json"), "years": args.years,
                                                    "checkpoint": str(scratch / "model.pt")}))
            (scratch / "Snakefile").write_text(FLOOR)
            ours, floor, peaks = [], [], []
            for _ in range(args.repeats):
                seconds, jobs, peak = dry_run(REPO / "Snakefile", scratch / "ours", config, env)
                ours.append(seconds)
                peaks.append(peak)
                seconds, floor_jobs, _ = dry_run(scratch / "Snakefile", scratch / "floor", floor_config, env)
                floor.append(seconds)
            if jobs != floor_jobs:
                sys.exit(f"the floor has {floor_jobs} jobs, ours {jobs}: the floor's shape is out of date")
            mine, base = statistics.median(ours), statistics.median(floor)
            part = ""
            if args.batches:
                seconds, _, _ = dry_run(REPO / "Snakefile", scratch / "ours", config, env, "--batch",
                                        f"all=1/{args.batches}")
                part = f" {seconds:>8.1f}"
            print(f"{tiles:>6} {jobs:>6} {mine:>8.1f} {base:>8.1f} {mine / base:>6.2f} {max(peaks) / 1024:>9.0f}{part}")


if __name__ == "__main__":
    main()
