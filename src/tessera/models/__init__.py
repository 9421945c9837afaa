"""The model registry: every TESSERA family is named here, and only here.

Importing this package is cheap (no torch): the config schema, the plan and the exports ask it for
family names and facts when the Snakefile is read. A family's model code is imported on first use.

Adding a family: write ``tessera/models/<module>.py`` with a :class:`tessera.models.family.Family`
subclass exposed as ``FAMILY`` (the interface is documented in ``family.py``), then add one
:class:`FamilyEntry` to ``REGISTRY`` below.

The rest of the package, by what it holds: ``checkpoint`` (reading checkpoints safely, strict
loading, ``load_model``, demo checkpoints), ``layers`` (shared torch modules), ``family`` (the
family interface), ``inputs`` (gathering standardised model inputs from a patch), ``sampling``
(which time steps each pixel gets), ``engine`` (running a model over patches on a device).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tessera.errors import UserError

if TYPE_CHECKING:
    from tessera.models.family import Family


@dataclass(frozen=True)
class FamilyEntry:
    """What the workflow needs to know of a family without loading its model code."""

    name: str  # in configs, on the CLI, in every output's provenance
    module: str  # tessera.models.<module> defines FAMILY
    dataset_version: str  # geotessera's dataset version of its embeddings (tessera_metadata.json)
    macs_per_pixel: float  # multiply-accumulates per pixel at typical sequence lengths (UPSTREAM.md §9)
    # How S2's 20 m bands were brought onto the 10 m grid in the family's training data: the
    # reference resampled with nearest until its commit 228c658 (2026-05-06, s2_fast_processor.py),
    # so every v1.x checkpoint saw nearest; the v2 models were trained after it (bilinear).
    s2_resampling: str


# v1.0 and v1.0-QAT always take 40 + 40 steps; v1.1, v2 (small) and the v2 teacher are bucketed,
# about 64 + 64 for a year of observations.
REGISTRY = (
    FamilyEntry("v2", "v2", "2.0", 0.43e9, "bilinear"),
    FamilyEntry("v1.0", "v1_0", "1.0", 3.53e9, "nearest"),
    FamilyEntry("v1.0-qat", "v1_0_qat", "1.0", 1.84e9, "nearest"),
    FamilyEntry("v1.1", "v1_1", "1.1", 3.40e9, "nearest"),
    FamilyEntry("v2-teacher", "v2_teacher", "2.0", 106e9, "bilinear"),
)
# What every family expects of the rest of the preprocessing, as the reference did it for all of
# them: OPERA's layover/shadow pixels kept (its fetch never reads the mask layer), same-datetime
# granules merged in the order the search returned them (stackstac's stable sort by datetime).
S1_LAYOVER_KEPT, S1_LAYOVER_MASKED = "kept", "masked"
GRANULE_ORDER = "datetime, then search order"
_BY_NAME = {entry.name: entry for entry in REGISTRY}


def family_names() -> list[str]:
    """Registered family names, e.g. for the config schema and CLI choices."""
    return list(_BY_NAME)


def family_entry(name: str) -> FamilyEntry:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UserError(f"model family {name!r} is unknown: use one of {', '.join(_BY_NAME)}") from None


def expected_preprocessing(name: str) -> dict[str, str]:
    """The preprocessing choices a family's checkpoints were trained on (keys as ``stack.Preprocessing``;
    the S2 harmonisation rule follows the data source and is checked as the kind of data)."""
    return {"s2_resampling": family_entry(name).s2_resampling, "s1_layover": S1_LAYOVER_KEPT,
            "granule_order": GRANULE_ORDER}


def get_family(name: str | Family) -> Family:
    """The family called ``name`` (a Family passes through), its model code imported on first use."""
    if not isinstance(name, str):
        return name
    family = importlib.import_module(f"tessera.models.{family_entry(name).module}").FAMILY
    assert family.name == name, f"tessera.models.{family_entry(name).module} defines {family.name}, not {name}"
    return family


def all_families() -> list[Family]:
    return [get_family(name) for name in _BY_NAME]


def __getattr__(name: str):
    # Checkpoint functions, importable from the package as before, without importing torch until used.
    if name in ("load_model", "make_demo_checkpoint", "checkpoint_sha256", "DEMO_MARKER"):
        from tessera.models import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
