"""The options of the fetch and infer stages: one object each, built once from the config or the
command line and passed through.

The config schema states the user-facing keys; these classes are the one place in the code that
names them: the rules turn a config into command-line flags with ``cli_args()``, the CLI parses
them back with ``add_arguments`` / ``from_args``, and the stage takes the object whole. Importing
this module is cheap (no torch): the Snakefile uses it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
S2_RESAMPLINGS = ("bilinear", "nearest")


class CommandLineOptions:
    """A frozen dataclass whose fields travel as ``--field-name value`` flags (booleans as bare flags).

    Subclasses give ``HELP``: field name -> (help text, extra argparse keyword arguments).
    """

    HELP: dict[str, tuple[str, dict]] = {}

    def cli_args(self) -> str:
        """The command-line flags that give these options back through :meth:`from_args`."""
        args = []
        for field in fields(self):
            value = getattr(self, field.name)
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            elif value is not None:
                args.append(f"{flag} {value}")
        return " ".join(args)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        defaults = cls()
        for field in fields(cls):
            help_text, keywords = cls.HELP[field.name]
            default = getattr(defaults, field.name)
            if isinstance(default, bool):
                keywords = {"action": "store_true", **keywords}
            else:
                keywords = {"default": default, "type": type(default) if default is not None else int, **keywords}
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, help=help_text, **keywords)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


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

    HELP = {
        "device": ("auto: CUDA when present, else CPU threads", {"choices": DEVICES}),
        "precision": ("auto (fp32 on CPU; bf16 on CUDA where the family allows), fp32, bf16, or int8 (CPU "
                      "dynamic quantisation: faster, not exact)", {"choices": PRECISIONS}),
        "seed": ("seed of the random time-step draws (v1.0 families), per tile and pixel", {}),
        "repeat_times": ("random draws averaged per pixel (v1.0 families)", {}),
        "batch_pixels": ("pixels per forward pass (of up to 64 time steps)", {}),
        "threads": ("CPU threads (default: OMP_NUM_THREADS, else the cores this job may use)", {}),
        "trust_checkpoint": ("allow checkpoints that need arbitrary pickles (only files you trust)", {}),
        "allow_source_mismatch": ("embed data of another kind (mpc/aws) than the checkpoint was trained on "
                                  "(v1.1)", {}),
    }

    @classmethod
    def from_config(cls, config: dict) -> InferOptions:
        """From a validated config (``tessera.config.validate``)."""
        infer, model = config["infer"], config["model"]
        return cls(device=config["device"], precision=infer["precision"], seed=infer["seed"],
                   repeat_times=infer["repeat_times"], batch_pixels=infer["batch_pixels"],
                   trust_checkpoint=model["trust_checkpoint"], allow_source_mismatch=model["allow_source_mismatch"])


@dataclass(frozen=True)
class FetchOptions(CommandLineOptions):
    """How scenes are kept and stacked (config ``fetch.*``; ``patch_size`` sets the stacks' chunking)."""

    min_coverage_pct: float = 0.01
    min_scenes: int = 1
    s2_resampling: str = "bilinear"
    patch_size: int = 512
    max_skipped_pct: float = 10.0

    HELP = {
        "min_coverage_pct": ("skip a date covering less than this percentage of the ROI pixels", {}),
        "min_scenes": ("fail the tile when fewer dates are usable", {}),
        "s2_resampling": ("resampling of S2 reflectance onto the tile grid", {"choices": S2_RESAMPLINGS}),
        "patch_size": ("inference patch edge (sets the stacks' chunking)", {}),
        "max_skipped_pct": ("fail the tile when more than this percentage of a sensor's scenes had to be "
                            "skipped (gone, refused or undecodable)", {}),
    }

    @classmethod
    def from_config(cls, config: dict) -> FetchOptions:
        fetch = config["fetch"]
        return cls(fetch["min_coverage_pct"], fetch["min_scenes"], fetch["s2_resampling"], config["patch_size"],
                   fetch["max_skipped_pct"])
