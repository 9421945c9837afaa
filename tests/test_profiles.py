"""Snakemake profiles: what a dry-run under each would submit, and installing the SLURM one."""

import pytest
import yaml

from conftest import REPO, run_snakemake
from tessera.errors import UserError
from tessera.profiles import install_profile


def _dry_run_resources(tmp_path, *args):
    result = run_snakemake(tmp_path, "-n", "--configfile", str(REPO / "config/demo.yaml"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs, rule = [], None
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("rule ") and line.endswith(":"):
            rule = line[5:-1]
        elif line.startswith("resources:") and rule:
            jobs.append((rule, dict(kv.split("=", 1) for kv in line[len("resources: "):].split(", "))))
    return jobs, result


def test_slurm_workflow_profile_maps_inference_to_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_PARTITION", "cpuq")
    monkeypatch.setenv("TESSERA_GPU_PARTITION", "gpuq")
    jobs, result = _dry_run_resources(tmp_path, "--workflow-profile", str(REPO / "profiles/slurm"))
    by_rule = {}
    for rule, res in jobs:
        by_rule.setdefault(rule, []).append(res)
    assert all(r["slurm_partition"] == "gpuq" and r["gpu"] == "1" for r in by_rule["infer"])
    for rule in ["fetch", "assemble", "publish"]:
        assert all(r["slurm_partition"] == "cpuq" and "gpu" not in r for r in by_rule[rule]), rule
    assert "$" not in result.stdout


def test_installed_profile_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    target = install_profile("slurm", cpu_partition="c1", gpu_partition="g1", account="proj")
    assert target == tmp_path / "cfg/snakemake/slurm/config.yaml"
    profile = yaml.safe_load(target.read_text())
    assert profile["default-resources"] == {"slurm_partition": "c1", "slurm_account": "proj"}
    jobs, _ = _dry_run_resources(tmp_path, "--profile", "slurm")
    infer = [res for rule, res in jobs if rule == "infer"]
    assert infer and all(r["slurm_partition"] == "g1" and r["slurm_account"] == "proj" for r in infer)


def test_install_profile_refuses_missing_partitions_and_silent_overwrite(tmp_path, monkeypatch):
    monkeypatch.delenv("TESSERA_CPU_PARTITION", raising=False)
    monkeypatch.delenv("TESSERA_GPU_PARTITION", raising=False)
    with pytest.raises(UserError, match="--cpu-partition"):
        install_profile("slurm", cpu_partition=None, gpu_partition=None, dest=tmp_path)
    install_profile("slurm", cpu_partition="a", gpu_partition="b", dest=tmp_path)
    with pytest.raises(UserError, match="--force"):
        install_profile("slurm", cpu_partition="x", gpu_partition="y", dest=tmp_path)
    install_profile("slurm", cpu_partition="x", gpu_partition="y", dest=tmp_path, force=True)


def test_resources_grow_with_attempt(tmp_path):
    jobs, _ = _dry_run_resources(tmp_path, "--cores", "2")
    fetch = next(res for rule, res in jobs if rule == "fetch")
    assert fetch["mem_mb"] == "1200" and fetch["runtime"] == "240"


def test_assemble_memory_follows_the_tile_and_the_family(tmp_path):
    """assemble asks for the measured peak of its tile's pixels and its family's numbers per pixel."""
    from tessera.assemble import memory_mb

    jobs, _ = _dry_run_resources(tmp_path, "--cores", "2")
    assemble = [res for rule, res in jobs if rule == "assemble"]
    assert assemble  # the dry-run of the demo lists its assemble jobs with their memory
    # The dry-run's own numbers follow the family (the teacher's 1,024 numbers per pixel) and the tile.
    whole_tile = ("--cores", "2", "--config", "roi=6.001,52.001,6.099,52.099")
    students, _ = _dry_run_resources(tmp_path / "v2", *whole_tile)
    teacher, _ = _dry_run_resources(tmp_path / "teacher", *whole_tile, "model={'family': 'v2-teacher', 'checkpoint': 'demo'}")
    ours, theirs = ([int(res["mem_mb"]) for name, res in jobs if name == "assemble"] for jobs in (students, teacher))
    assert len(ours) == len(theirs) == 1 and theirs[0] > 4 * ours[0] > 4 * 1000
    full_tile = 731 * 1140  # 0.1° at 52° N
    assert memory_mb(full_tile, 128, 512 * 512) < 2000 < memory_mb(full_tile, 1024, 512 * 512)
    # Above the measured peaks (MiB) at 128 and 1,024 numbers.
    assert memory_mb(full_tile, 128, 512 * 512) > 1004 * 1.048576
    assert memory_mb(full_tile, 1024, 512 * 512) > 6886 * 1.048576
    # Without a COG, the quantisation's peak: a patch in float32 and the codes.
    assert memory_mb(full_tile, 1024, 512 * 512, cog=False) < memory_mb(full_tile, 1024, 512 * 512) / 3
    # A small ROI in a large patch: reading the patch is the peak.
    assert memory_mb(1000, 1024, 512 * 512) > memory_mb(1000, 1024, 16 * 16)


def test_infer_memory_follows_the_patch_the_family_and_the_checkpoint(tmp_path):
    """infer asks for more than the measured peaks (MiB), and for the weights and outputs of larger models."""
    from tessera.download import checkpoint_bytes
    from tessera.infer import memory_mb

    assert memory_mb(512 * 512, 128, 0) * 1e6 > 1.05 * 3370 * 2**20
    assert memory_mb(256 * 256, 128, 0) * 1e6 > 1.05 * 2644 * 2**20
    teacher = checkpoint_bytes("v2-teacher", tmp_path)  # not downloaded: its recorded size
    assert teacher == 8_257_134_395
    assert memory_mb(512 * 512, 1024, teacher) > memory_mb(512 * 512, 128, 0) + teacher / 1e6 + 512 * 512 * 896 * 4 / 1e6
    local = tmp_path / "mine.pt"
    local.write_bytes(b"0" * 5_000_000)
    assert checkpoint_bytes(str(local)) == 5_000_000 and checkpoint_bytes("demo") == 0
