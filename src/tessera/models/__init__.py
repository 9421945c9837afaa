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
from tessera.models.quantisation import V1_QUANTISATION, V2_QUANTISATION, Quantisation

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
    # What assemble needs, without the model code (each agrees with the family's FAMILY; tested):
    quantisation: Quantisation  # the int8 storage
    matryoshka: bool  # a prefix of the embedding is usable alone (export.dims)
    embedding_dims: int  # numbers per pixel at the published size (sizes assemble's memory)


# v1.0 and v1.0-QAT always take 40 + 40 steps; v1.1, v2 (small) and the v2 teacher are bucketed,
# about 64 + 64 for a year of observations.
REGISTRY = (
    FamilyEntry("v2", "v2", "2.0", 0.43e9, "bilinear", V2_QUANTISATION, True, 128),
    FamilyEntry("v1.0", "v1_0", "1.0", 3.53e9, "nearest", V1_QUANTISATION, False, 128),
    FamilyEntry("v1.0-qat", "v1_0_qat", "1.0", 1.84e9, "nearest", V1_QUANTISATION, False, 128),
    FamilyEntry("v1.1", "v1_1", "1.1", 3.40e9, "nearest", V1_QUANTISATION, False, 128),
    FamilyEntry("v2-teacher", "v2_teacher", "2.0", 106e9, "bilinear", V2_QUANTISATION, False, 1024),
)
# What every family expects of the rest of the preprocessing, as the reference did it for all of
# them: OPERA's layover/shadow pixels kept (its fetch never reads the mask layer), same-datetime
# granules merged in the order the search returned them (stackstac's stable sort by datetime).
S1_LAYOVER_KEPT, S1_LAYOVER_MASKED = "kept", "masked"
GRANULE_ORDER = "datetime, then search order"
_BY_NAME = {entry.name: entry for entry in REGISTRY}


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A checkpoint published on Hugging Face that ``model.checkpoint`` accepts by name."""

    name: str  # model.checkpoint: <name>
    family: str  # a REGISTRY name
    repo_id: str  # Hugging Face model repository
    filename: str  # path inside the repository
    size: int | None  # bytes, where known
    sha256: str | None  # hex, where known
    params: str  # parameter count as published


HUB = "https://huggingface.co"
# Repositories and file names: ucam-eo/tessera's tessera_infer_v2 download_weights.py (UPSTREAM.md §6).
# Sizes and SHA-256: pins of these files in a third-party port (mere.run's TESSERAResources, at
# revisions N 9645033, S 21760b2, M 41db8ee, L b45f244, Teacher 2621706); the sizes agree with the
# published ones (4 MB, 28 MB, 84 MB, 175 MB, 8.26 GB). Not checked against the Hub from here.
PUBLISHED = (
    PublishedCheckpoint("v2-nano", "v2", "geotessera/TESSERA-V-2.0-2B-N", "ckpt/student_nano.pt", 4_288_221,
                        "bc9929e3643dfab2744c2ce14e7c14f698703a94e9562e4e0982f9d6540b0691", "1.07 M"),
    PublishedCheckpoint("v2-small", "v2", "geotessera/TESSERA-V-2.0-2B-S", "ckpt/student_small.pt", 28_488_531,
                        "92619d4ffc2936895f145fdcf710140b58c23c860e02f01873828b10c6958d95", "7.11 M"),
    PublishedCheckpoint("v2-medium", "v2", "geotessera/TESSERA-V-2.0-2B-M", "ckpt/student_medium.pt", 84_163_403,
                        "3823be7db9d9cfc93f3c2a47c7699be82821ab4e1117d4d2befdb746941ee96e", "21.03 M"),
    PublishedCheckpoint("v2-large", "v2", "geotessera/TESSERA-V-2.0-2B-L", "ckpt/student_large.pt", 175_363_923,
                        "b5f20239dbb1849c01a3e407b095aafe39b0bf764300206af78cb9b85f9ec1e1", "43.83 M"),
    PublishedCheckpoint("v2-teacher", "v2-teacher", "geotessera/TESSERA-V-2.0-2B-Teacher",
                        "ckpt/tessera_v2_2B_teacher.pt", 8_257_134_395,
                        "bfca890a9956485edf9d6be61375fde4cd0b4cb4b47db79596f0523a289aa555", "2.06 B"),
)
# Families whose checkpoints are not fetched by name, and where to get them: the file names of
# UPSTREAM.md §4.4, §4.6, §5.2 (Google Drive links in ucam-eo/tessera's README); the Hugging Face
# model pages geotessera/TESSERA-V-1.0 (recommending tessera-v1.0-QAT-best.pt) and -V-1.1 exist too,
# their file lists not confirmed here: hf://geotessera/TESSERA-V-1.1/<file> fetches one.
NOT_BY_NAME = {
    "v1.0": "best_model_fsdp_20250427_084307.pt from the Google Drive link in ucam-eo/tessera's README "
            "(or a file of hf://geotessera/TESSERA-V-1.0)",
    "v1.0-qat": "best_model_fsdp_20250608_220648_QAT.pt from the Google Drive link in ucam-eo/tessera's README "
                "(or tessera-v1.0-QAT-best.pt of hf://geotessera/TESSERA-V-1.0)",
    "v1.1": "tessera_v1_1_{mpc,aws}_encoder.pt from the Google Drive link in ucam-eo/tessera's README "
            "(or a file of hf://geotessera/TESSERA-V-1.1)",
}
_PUBLISHED_BY_NAME = {entry.name: entry for entry in PUBLISHED}


def published_checkpoint(name: str) -> PublishedCheckpoint | None:
    """The published checkpoint called ``name``, or None."""
    return _PUBLISHED_BY_NAME.get(name)


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
