"""The options of the fetch and infer stages: one object each, built once from the config or the
command line and passed through.

The config schema states the user-facing keys; these classes are the one place in the code that
names them: the rules turn a config into command-line flags with ``cli_args()``, the CLI parses
them back with ``add_arguments`` / ``from_args``, and the stage takes the object whole. Importing
this module is cheap (no torch): the Snakefile uses it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace

from tessera.period import ALL_ORBITS, S1_ORBIT_DIRECTIONS, WHOLE_YEAR, Period

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
S2_RESAMPLINGS = ("family", "bilinear", "nearest")  # family: the one the model family was trained on


def available_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's allocation, not the node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CommandLineOptions:
    """A frozen dataclass whose fields travel as ``--field-name value`` flags (booleans as bare flags).

    Subclasses give ``HELP``: field name -> (help text, extra argparse keyword arguments).
    """

    HELP: dict[str, tuple[str, dict]] = {}

    def cli_args(self, only: tuple[str, ...] | None = None) -> str:
        """The command-line flags that give these options (``only`` those fields) back through :meth:`from_args`."""
        args = []
        for field in fields(self):
            if only is not None and field.name not in only:
                continue
            value = getattr(self, field.name)
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            elif value is not None:
                args.append(f"{flag} {value}")
        return " ".join(args)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
        defaults = cls()
        for field in fields(cls):
            if only is not None and field.name not in only:
                continue
            help_text, keywords = cls.HELP[field.name]
            default = getattr(defaults, field.name)
            if isinstance(default, bool):
                keywords = {"action": "store_true", **keywords}
            else:
                keywords = {"default": default, "type": type(default) if default is not None else int, **keywords}
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, help=help_text, **keywords)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """From parsed flags; fields without a flag (see ``only``) keep their defaults."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)})


@dataclass(frozen=True)
class InferOptions(CommandLineOptions):
    """How inference runs (config ``device``, ``infer.*``, ``model.trust_checkpoint``,
    ``model.allow_source_mismatch``); ``threads`` comes from the job."""

    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    repeat_times: int = 1
    batch_pixels: int = 4096
    threads: int | None = None
    trust_checkpoint: bool = False
    allow_source_mismatch: bool = False
    allow_preprocessing_mismatch: bool = False

    # What the outputs' provenance records of inference (the publish stage takes these flags only).
    PROVENANCE = ("device", "precision", "seed", "repeat_times")

    HELP = {
        "device": ("auto: CUDA when present, else CPU threads", {"choices": DEVICES}),
        "precision": ("auto (the reference's: fp32, except bf16 autocast on CUDA for v1.1), fp32, bf16, or int8 "
                      "(CPU dynamic quantisation: faster, not exact)", {"choices": PRECISIONS}),
        "seed": ("seed of the random time-step draws (v1.0 families), per tile and pixel", {}),
        "repeat_times": ("random draws averaged per pixel (v1.0 families)", {}),
        "batch_pixels": ("pixels per forward pass (of up to 64 time steps)", {}),
        "threads": ("CPU threads (default: OMP_NUM_THREADS, else the cores this job may use)", {}),
        "trust_checkpoint": ("allow checkpoints that need arbitrary pickles (only files you trust)", {}),
        "allow_source_mismatch": ("embed data of another kind (mpc/aws) than the checkpoint was trained on "
                                  "(v1.1)", {}),
        "allow_preprocessing_mismatch": ("embed stacks prepared otherwise (S2 resampling, S1 layover policy, "
                                         "granule order) than the family's checkpoints were trained on", {}),
    }

    @classmethod
    def from_config(cls, config: dict) -> InferOptions:
        """From a validated config (``tessera.config.validate``)."""
        infer, model = config["infer"], config["model"]
        return cls(device=config["device"], precision=infer["precision"], seed=infer["seed"],
                   repeat_times=infer["repeat_times"], batch_pixels=infer["batch_pixels"],
                   trust_checkpoint=model["trust_checkpoint"], allow_source_mismatch=model["allow_source_mismatch"],
                   allow_preprocessing_mismatch=model["allow_preprocessing_mismatch"])


@dataclass(frozen=True)
class FetchOptions(CommandLineOptions):
    """How scenes are kept and stacked (config ``fetch.*``, ``period``; ``patch_size`` sets the stacks'
    chunking; ``family``, the config's ``model.family``, gives the defaults of the choices that follow the
    checkpoint's training data)."""

    min_coverage_pct: float = 0.01
    min_scenes: int = 1
    s2_resampling: str = "family"
    s1_mask_layover: bool = False
    patch_size: int = 512
    family: str | None = "v2"
    max_skipped_pct: float = 10.0
    # None (the whole year; both orbit directions) leaves the flags out, so that the commands of runs
    # made before these options existed stay the same and their fetches are not redone.
    period: str | None = None
    s1_orbit_state: str | None = None

    HELP = {
        "min_coverage_pct": ("skip a date covering less than this percentage of the ROI pixels", {}),
        "min_scenes": ("fail the tile when fewer dates are usable", {}),
        "s2_resampling": ("resampling of S2 reflectance onto the tile grid (family: the one the model family "
                          "was trained on)", {"choices": S2_RESAMPLINGS}),
        "s1_mask_layover": ("drop the pixels of OPERA's layover/shadow mask (the reference keeps them)", {}),
        "patch_size": ("inference patch edge (sets the stacks' chunking)", {}),
        "family": ("model family the stacks are for (the defaults of the choices that follow it)", {"type": str}),
        "max_skipped_pct": ("fail the tile when more than this percentage of a sensor's scenes had to be "
                            "skipped (gone, refused or undecodable)", {}),
        "period": ("only these month-days of the year, MM-DD/MM-DD, both included (default: the whole year)",
                   {"type": str}),
        "s1_orbit_state": ("keep only this orbit direction's Sentinel-1 scenes (default: both)",
                           {"type": str, "choices": S1_ORBIT_DIRECTIONS}),
    }

    @property
    def time_series(self) -> tuple[Period, str]:
        """The part of each year and the S1 orbit directions (``both``, ``ascending``, ``descending``) kept."""
        return (WHOLE_YEAR if self.period is None else Period.parse(self.period),
                self.s1_orbit_state or ALL_ORBITS)

    @property
    def s2_method(self) -> str:
        """The S2 resampling in effect: the user's, else the family's (``models.REGISTRY``)."""
        if self.s2_resampling != "family":
            return self.s2_resampling
        from tessera.models import family_entry  # cheap: the registry imports no torch

        return family_entry(self.family or "v2").s2_resampling

    @classmethod
    def from_config(cls, config: dict) -> FetchOptions:
        """With the family's defaults resolved: the rule's flags name only what the fetch does, so
        that switching to a family trained on the same preprocessing does not fetch again."""
        fetch = config["fetch"]
        period, orbit = config["period"], fetch["s1_orbit_state"]
        given = cls(fetch["min_coverage_pct"], fetch["min_scenes"], fetch["s2_resampling"] or "family",
                    fetch["s1_mask_layover"], config["patch_size"], config["model"]["family"], fetch["max_skipped_pct"],
                    period=f"{period['start']}/{period['end']}" if period else None,
                    s1_orbit_state=None if orbit == ALL_ORBITS else orbit)
        return replace(given, s2_resampling=given.s2_method, family=None)
