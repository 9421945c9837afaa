import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_snakemake(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the workflow with the test interpreter's tools first on PATH (rules call `tessera`)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake run or dry-run, as {rule: count}."""
    lines = output.splitlines()
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
