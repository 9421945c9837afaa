"""envs/tessera.yaml installs this checkout (with the demo extra) the way Snakemake creates it.

Snakemake copies the file to .snakemake/conda/<hash>.yaml and runs `conda env create --file` on the
copy (snakemake/deployment/conda.py); conda hands the pip entries to pip as a requirements file in
that copy's folder. Creating the environment needs conda and the network, which these tests do not
have: they check what pip makes of the pip section there, and the conda packages against pyproject.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tessera.config import WORKFLOW_DIR_VARIABLE, export_workflow_dir

from conftest import REPO

ENV_FILE = REPO / "envs" / "tessera.yaml"


def _env():
    env = yaml.safe_load(ENV_FILE.read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return conda, pip


def test_pip_section_resolves_to_this_checkout_from_snakemakes_copy(tmp_path, monkeypatch):
    _, pip = _env()
    monkeypatch.delenv(WORKFLOW_DIR_VARIABLE, raising=False)
    export_workflow_dir(REPO)  # what rules/common.smk does with workflow.basedir when Snakemake reads it
    copy_dir = tmp_path / "work" / ".snakemake" / "conda"  # where Snakemake puts the env file's copy
    copy_dir.mkdir(parents=True)
    shutil.copy(ENV_FILE, copy_dir / "0123abcd.yaml")
    requirements = copy_dir / "condaenv.requirements.txt"  # what conda writes for pip
    requirements.write_text("\n".join(pip) + "\n")
    env = dict(os.environ)  # conda and pip inherit the driver's environment
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
         "--quiet", "--report", "-", "-r", requirements.name],
        cwd=copy_dir, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (install,) = json.loads(result.stdout)["install"]
    assert install["metadata"]["name"] == "tessera-workflow"
    assert install["download_info"]["url"] == REPO.as_uri()
    assert install["download_info"]["dir_info"].get("editable") is True
    assert install["requested_extras"] == ["demo"]


def test_the_snakefile_sets_the_checkout_path_the_env_file_names():
    _, pip = _env()
    assert any("${TESSERA_WORKFLOW_DIR}" in entry for entry in pip)
    common = (REPO / "rules" / "common.smk").read_text()
    assert "tessera_config.export_workflow_dir(workflow.basedir)" in common
    assert (REPO / "rules" / "common.smk").read_text().count("../envs/tessera.yaml") == 1


def test_conda_packages_agree_with_pyproject():
    conda, _ = _env()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    python = next(d for d in conda if d.startswith("python"))
    version = re.sub(r"^python[=<>]*", "", python)
    assert SpecifierSet(project["requires-python"]).contains(version + ".0"), (python, project["requires-python"])
    needed = {Requirement(d).name.lower(): Requirement(d).specifier for d in project["dependencies"]}
    for entry in conda:
        name = re.split(r"[=<>!~ ]", entry, maxsplit=1)[0].lower()
        if name in ("python", "pip", "gdal"):  # gdal: the library rasterio and pyogrio link against
            continue
        assert name in needed, f"{entry}: conda installs a package that pyproject.toml does not need"
        conda_spec = SpecifierSet(entry[len(name):].replace("=", "==") if re.match(r"=\d", entry[len(name):])
                                  else entry[len(name):])
        # Same lower bound: conda's build satisfies pyproject, so pip keeps it instead of a wheel.
        lower = [s.version for s in conda_spec if s.operator in (">=", "==")]
        assert lower and needed[name].contains(lower[0]), (entry, str(needed[name]))
    extras = project["optional-dependencies"]
    assert "demo" in extras and "[demo]" in _env()[1][0]
