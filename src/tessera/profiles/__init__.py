"""Installing the shipped Snakemake profiles where `snakemake --profile NAME` finds them.

Snakemake looks for a profile named NAME in the working directory, ``$XDG_CONFIG_HOME/snakemake``
(``~/.config/snakemake``) and ``/etc/xdg/snakemake``, not in the workflow's ``profiles/`` folder
(that one is reached with ``--workflow-profile NAME``). Installing renders the site values
(partitions, account, QoS) into a copy, so nothing depends on environment variables later.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

from tessera import __version__
from tessera.errors import UserError
from tessera.io import atomic_path

SHIPPED = ("slurm",)


def user_profile_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "snakemake"


def render_slurm_profile(*, cpu_partition: str, gpu_partition: str, account: str | None, qos: str | None) -> dict:
    profile = yaml.safe_load((resources.files("tessera") / "profiles/slurm.yaml").read_text())
    defaults = profile["default-resources"]
    defaults["slurm_partition"] = cpu_partition
    profile["set-resources"]["infer"]["slurm_partition"] = gpu_partition
    if account:
        defaults["slurm_account"] = account
    if qos:
        defaults["qos"] = qos
    return profile


def install_profile(
    name: str, *, cpu_partition: str | None, gpu_partition: str | None, account: str | None = None,
    qos: str | None = None, dest: Path | None = None, force: bool = False,
) -> Path:
    if name not in SHIPPED:
        raise UserError(f"profile {name!r} is not shipped: choose one of {', '.join(SHIPPED)}")
    cpu_partition = cpu_partition or os.environ.get("TESSERA_CPU_PARTITION")
    gpu_partition = gpu_partition or os.environ.get("TESSERA_GPU_PARTITION")
    if not cpu_partition or not gpu_partition:
        raise UserError("install-profile slurm needs the partition names: pass --cpu-partition and --gpu-partition "
                        "(or set TESSERA_CPU_PARTITION and TESSERA_GPU_PARTITION); `sinfo -s` lists them")
    profile = render_slurm_profile(cpu_partition=cpu_partition, gpu_partition=gpu_partition,
                                   account=account or os.environ.get("TESSERA_SLURM_ACCOUNT"),
                                   qos=qos or os.environ.get("TESSERA_SLURM_QOS"))
    target = (dest or user_profile_dir()) / name / "config.yaml"
    text = (f"# Installed by `tessera install-profile {name}` (tessera-workflow {__version__}).\n"
            "# Use: snakemake --profile slurm --configfile my.yaml  (from the workflow's directory)\n"
            + yaml.safe_dump(profile, sort_keys=False))
    if target.exists() and target.read_text() != text and not force:
        raise UserError(f"profile {str(target)!r} exists with other settings: pass --force to replace it")
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return target
