"""Resumability: a killed run finishes on rerun with identical outputs and without redoing finished
work; a failing tile does not stop the others, and after a repair only that tile runs."""

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pystac
import pytest
import shapely
import yaml
from shapely import box

from conftest import BIN, REPO, job_stats, run_snakemake, write_tiny_config
from faults import flip_byte
from tessera.config import validate
from tessera.layout import PATCH_SUFFIX
from tessera.plan import make_plan

pytestmark = pytest.mark.slow


def _start(workdir: Path, config: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(config),
         "--cores", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )


def _marked_incomplete(workdir: Path) -> set[str]:
    """Outputs Snakemake has marked as being written (its .snakemake/incomplete records)."""
    marks = set()
    for record in (workdir / ".snakemake/incomplete").glob("*"):
        try:
            marks.add(base64.urlsafe_b64decode(record.name).decode())
        except ValueError:
            continue
    return marks


def _finished_files(workdir: Path) -> dict[str, int]:
    """Output files (results and patch embeddings) whose job had finished: path -> mtime_ns."""
    incomplete = _marked_incomplete(workdir)
    found = {}
    for path in [*(workdir / "results").rglob("*"), *(workdir / "work").glob(f"*/*/patches/*{PATCH_SUFFIX}")]:
        relative = str(path.relative_to(workdir))
        if path.is_file() and not path.name.startswith(".") and not any(relative.startswith(m) for m in incomplete):
            found[relative] = path.stat().st_mtime_ns
    return found


def _kill_when(process: subprocess.Popen, condition, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before reaching the point where it should be killed"
        assert time.monotonic() < deadline, "the run never reached the point where it should be killed"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _results(workdir: Path) -> dict[str, bytes]:
    # The sidecar records when it was generated and the report how long jobs took; every data
    # product must match byte for byte.
    return {str(p.relative_to(workdir)): p.read_bytes() for p in (workdir / "results").rglob("*")
            if p.is_file() and p.name not in ("tessera_metadata.json", "report.html")}


def test_killed_runs_resume_to_identical_outputs_without_redoing_finished_work(tmp_path, tiny_demo_run):
    config = write_tiny_config(tmp_path)
    kill_points = {
        "fetch": lambda: any(f.stat().st_size > 200 for f in (tmp_path / "logs/fetch").rglob("*.log")),
        "inference": lambda: any("/patches/" in f for f in _finished_files(tmp_path)),
        "export": lambda: any(f.startswith("results/cog/") for f in _finished_files(tmp_path)),
    }
    finished_at_kill: dict[str, int] = {}
    for point, reached in kill_points.items():
        run = _start(tmp_path, config)
        _kill_when(run, reached)
        finished = _finished_files(tmp_path)
        finished_at_kill.update(finished)
        unlock = run_snakemake(tmp_path, "--unlock", "--configfile", str(config))
        assert unlock.returncode == 0, unlock.stderr[-2000:]
    assert any("results/cog" in f for f in finished_at_kill), "no tile had finished before the last kill"

    rerun = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    recomputed = [f for f, mtime in finished_at_kill.items() if (tmp_path / f).stat().st_mtime_ns != mtime]
    assert recomputed == [], f"finished outputs were recomputed: {recomputed}"
    reference_dir, _, _ = tiny_demo_run
    assert _results(tmp_path) == _results(reference_dir)
    leftovers = [p for p in tmp_path.rglob(".*tmp*")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def _two_far_apart_tiles_roi(directory: Path) -> Path:
    # One small part in each of two tiles, far enough apart that each is covered by only one of the
    # demo's two granules (the west one in UTM 31, the east one in UTM 32).
    parts = shapely.MultiPolygon([box(5.905, 52.040, 5.909, 52.042), box(6.091, 52.040, 6.095, 52.042)])
    path = directory / "roi.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(parts)}))
    return path


def test_a_failing_tile_does_not_stop_the_others_and_only_it_reruns(tmp_path):
    config = write_tiny_config(tmp_path, roi=str(_two_far_apart_tiles_roi(tmp_path)))
    catalog_run = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "work/demo/2024/catalog.json")
    assert catalog_run.returncode == 0, catalog_run.stderr[-3000:]
    # Break every Sentinel-2 scene of the east granules: tile grid_6.05_52.05 then has no usable date.
    catalog = pystac.Catalog.from_file(str(tmp_path / "work/demo/2024/catalog.json"))
    backup = tmp_path / "backup"
    broken = 0
    for item in catalog.get_child("sentinel-2-l2a").get_items():
        if item.properties.get("proj:code", f"EPSG:{item.properties.get('proj:epsg')}") == "EPSG:32632":
            asset = Path(item.assets["B04"].get_absolute_href())
            (backup / asset.relative_to(tmp_path)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(asset, backup / asset.relative_to(tmp_path))
            asset.write_bytes(asset.read_bytes()[:300])  # a truncated COG
            broken += 1
    assert broken > 0

    first = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "--keep-going")
    assert first.returncode != 0
    log = first.stdout + first.stderr
    assert "Error in rule fetch" in log and "grid_6.05_52.05" in log
    assert "Traceback" not in (tmp_path / "logs/fetch/2024/grid_6.05_52.05.log").read_text()
    west = tmp_path / "results/global_0.1_degree_representation/2024/grid_5.95_52.05/grid_5.95_52.05.npy"
    assert west.exists() and (tmp_path / "results/cog/2024/grid_5.95_52.05_2024.tif").exists()
    assert not (tmp_path / "results/global_0.1_degree_representation/2024/grid_6.05_52.05").exists()
    west_mtime = west.stat().st_mtime_ns

    shutil.copytree(backup, tmp_path, dirs_exist_ok=True)  # repair the scenes
    second = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2")
    assert second.returncode == 0, second.stderr[-4000:]
    stats = job_stats(second.stdout + second.stderr)
    # The planned patches of the repaired tile, one inference job each (the tiny config's infer.per).
    plan = make_plan(validate(yaml.safe_load(config.read_text())))
    east_patches = len(plan.by_name["grid_6.05_52.05"].patches)
    assert east_patches > 1 and stats["fetch"] == 1 and stats["infer"] == east_patches and stats["assemble"] == 1 and stats["publish"] == 1
    assert "demo_catalog" not in stats and "demo_checkpoint" not in stats
    assert west.stat().st_mtime_ns == west_mtime


def test_a_damaged_patch_is_removed_when_found_and_rebuilt_by_the_next_run(tmp_path, tiny_demo_run):
    reference_dir, _, _ = tiny_demo_run
    workdir = Path(shutil.copytree(reference_dir, tmp_path / "run"))
    config = workdir / "tiny.yaml"
    patch = sorted(workdir.glob(f"work/*/*/patches/*{PATCH_SUFFIX}"))[0]
    tile = patch.parent.parent.name
    flip_byte(patch)
    # Something must read the patch for the damage to show: here a lost export of its tile.
    (workdir / f"results/global_0.1_degree_representation/2024/{tile}/{tile}.npy").unlink()

    found = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert found.returncode != 0
    log = (workdir / f"logs/assemble/2024/{tile}.log").read_text()
    assert f"{patch.relative_to(workdir)} is damaged" in log and "removed it; run the workflow again" in log and "Traceback" not in log
    assert not patch.exists()

    rebuilt = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert rebuilt.returncode == 0, rebuilt.stderr[-4000:]
    stats = job_stats(rebuilt.stdout + rebuilt.stderr)
    assert stats["infer"] == 1 and stats["assemble"] == 1 and "fetch" not in stats
    assert _results(workdir) == _results(reference_dir)
