"""The demo through a real SLURM (started by .ci/slurm-up.sh): inference on the GPU partition,
everything else on the CPU partition, outputs identical to a local run."""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_snakemake, write_tiny_config

pytestmark = pytest.mark.slow
SLURM_RUN = Path(os.environ.get("SLURM_RUN_DIR", "/tmp/tessera-slurm"))


def _slurm_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    return result.returncode == 0 and "gpu" in result.stdout


@pytest.fixture(scope="module")
def slurm():
    if not _slurm_is_up():
        if os.environ.get("TESSERA_REQUIRE_SLURM") == "1":
            pytest.fail("TESSERA_REQUIRE_SLURM=1 but no SLURM answers: run .ci/slurm-up.sh first")
        pytest.skip("no SLURM here (start one with .ci/slurm-up.sh)")
    return SLURM_RUN / "jobcomp.log"


def _partitions_by_job(jobcomp: Path) -> dict[str, str]:
    records = {}
    for line in jobcomp.read_text().splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        records[fields["JobId"]] = (fields["Partition"], fields["JobState"])
    return records


def test_demo_on_slurm_uses_gpu_partition_for_inference_only(slurm, tmp_path, tiny_demo_run, monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_PARTITION", "cpu")
    monkeypatch.setenv("TESSERA_GPU_PARTITION", "gpu")
    config = write_tiny_config(tmp_path)
    result = run_snakemake(
        tmp_path, "--configfile", str(config), "--workflow-profile", str(REPO / "profiles/slurm"),
        "--jobs", "4", "--latency-wait", "5", "--set-threads", "infer=1",
        # This test cluster has no accounting database: poll with squeue.
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
        timeout=1500,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    # Snakemake's log names the SLURM job id of every rule it submitted; SLURM's completion
    # records say on which partition each ran.
    submitted = re.findall(r"rule_([a-z0-9_]+)/.*?/(\d+)\.log", log)
    submitted += [(rule, job) for job, rule in re.findall(r"SLURM jobid (\d+).*?rule_([a-z0-9_]+)", log)]
    records = _partitions_by_job(slurm)
    rules_by_partition: dict[str, set[str]] = {}
    for rule, job in set(submitted):
        partition, state = records[job]
        assert state == "COMPLETED", (rule, job, state)
        rules_by_partition.setdefault(partition, set()).add(rule)
    assert rules_by_partition["gpu"] == {"infer"}
    assert "infer" not in rules_by_partition["cpu"] and {"fetch", "assemble", "publish"} <= rules_by_partition["cpu"]

    local_dir, _, _ = tiny_demo_run
    tiles = sorted((local_dir / "results/global_0.1_degree_representation/2024").iterdir())
    assert len(tiles) == 2
    for tile in tiles:
        for name in [f"{tile.name}.npy", f"{tile.name}_scales.npy"]:
            # Digests, not the bytes: pytest's diff of two differing megabyte-long byte strings runs for hours.
            local = hashlib.sha256((tile / name).read_bytes()).hexdigest()
            remote = hashlib.sha256(
                (tmp_path / "results/global_0.1_degree_representation/2024" / tile.name / name).read_bytes()).hexdigest()
            assert local == remote, f"{tile.name}/{name} differs between the SLURM and the local run"
