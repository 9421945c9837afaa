import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The project's shared reference material lies beside the checkout (CI clones main next to it).
SHARED = REPO.parent / "shared"
VECTORS = SHARED / "reference" / "vectors"
STAC_FIXTURES = SHARED / "fixtures" / "stac"
BIN = Path(sys.executable).parent
# Outside the project (a clone without shared/ beside it) the tests that read it are skipped; CI
# sets TESSERA_REQUIRE_SHARED so that they fail there instead.
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir() and not os.environ.get("TESSERA_REQUIRE_SHARED"),
    reason=f"needs the project's reference vectors and STAC fixtures at {SHARED} (shared/ beside the checkout)",
)


def run_snakemake(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the workflow with the test interpreter's tools first on PATH (rules call `tessera`)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake run or dry-run, as {rule: count}."""
    lines = [line.strip() for line in output.splitlines()]
    start = lines.index("Job stats:") + 3
    stats = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        stats[parts[0]] = int(parts[1])
    return stats


@pytest.fixture
def repo() -> Path:
    return REPO


# Two tiles either side of the UTM 31/32 edge, a few hundred pixels in all: the whole workflow in
# about a minute.
TINY_ROI = "5.998,52.040,6.002,52.042"


def write_tiny_config(directory: Path, **overrides) -> Path:
    config = {"roi": TINY_ROI, "year": 2024, "source": "demo", "patch_size": 16,
              "model": {"family": "v2", "checkpoint": "demo"}, "device": "cpu", "infer": {"per": "patch"},
              # Fewer synthetic dates than the demo's 5/12 days: the same code paths, a quicker run.
              "demo": {"s2_revisit_days": 15, "s1_revisit_days": 24}, **overrides}
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory):
    """One local run of the tiny demo, shared by the tests that inspect its outputs."""
    workdir = tmp_path_factory.mktemp("tiny-demo")
    config = write_tiny_config(workdir)
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, config, result
