"""The model registry: TESSERA families, safe checkpoint loading and demo checkpoints.

Adding a family: write ``tessera/models/<family>.py`` with a :class:`tessera.models.base.Family`
subclass exposed as ``FAMILY`` (the interface is documented in ``base.py``), then add its module to
``_FAMILY_MODULES`` below. Nothing else in the code base names families.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
from typing import Any

import torch
from torch import nn

from tessera.errors import UserError
from tessera.io import atomic_path, sha256_file
from tessera.models.base import Family, load_state_dict_strictly, normalise_state_dict, read_checkpoint

log = logging.getLogger(__name__)

_FAMILY_MODULES = ("v2", "v1_0", "v1_0_qat", "v1_1", "v2_teacher")

FAMILIES: dict[str, Family] = {}
for _module in _FAMILY_MODULES:
    _family = importlib.import_module(f"tessera.models.{_module}").FAMILY
    FAMILIES[_family.name] = _family

# Top-level key that marks demo checkpoints, so that nobody mistakes their output for embeddings.
DEMO_MARKER = "tessera_demo"


def family_names() -> list[str]:
    """Registered family names, e.g. for CLI choices."""
    return list(FAMILIES)


def get_family(name: str | Family) -> Family:
    """The registered family called ``name`` (a Family passes through)."""
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"model family {name!r} is unknown: use one of {', '.join(FAMILIES)}") from None


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a checkpoint file, recorded with every output."""
    return sha256_file(path)


def matching_families(checkpoint: dict) -> list[Family]:
    """Families whose checkpoint layout and state-dict keys the checkpoint has."""
    found = []
    for family in FAMILIES.values():
        state_dict = family.state_dict_from_checkpoint(checkpoint)
        if state_dict is not None and family.matches_keys(set(normalise_state_dict(state_dict))):
            found.append(family)
    return found


def _choose_family(checkpoint: dict, requested: str | Family | None, name: str) -> Family:
    found = matching_families(checkpoint)
    if requested is None:
        if len(found) == 1:
            log.info("checkpoint %s: detected model family %s", name, found[0].name)
            return found[0]
        if not found:
            raise UserError(f"checkpoint {name!r} is not a known TESSERA checkpoint (top-level keys "
                            f"{sorted(map(str, checkpoint))[:5]}): use a published checkpoint or set the family")
        raise UserError(f"checkpoint {name!r} could be any of {', '.join(f.name for f in found)}: set the "
                        "model family explicitly")
    family = get_family(requested)
    if family not in found:
        if found:
            raise UserError(f"checkpoint {name!r} looks like family {found[0].name}, not {family.name}: set the "
                            f"model family to {found[0].name} or use a {family.name} checkpoint")
        raise UserError(f"checkpoint {name!r} is not a {family.name} checkpoint (its keys match no known "
                        "family): use a published checkpoint")
    return family


def load_model(checkpoint_path: str | os.PathLike, family: str | Family | None = None, *,
               trust_checkpoint: bool = False, **arch: Any) -> nn.Module:
    """The encoder of a checkpoint, strictly loaded, in eval mode, with ``.family`` and ``.arch``.

    The architecture comes from the checkpoint where it records one, else from the family's
    defaults; keyword arguments override either. ``family=None`` detects the family from the keys.
    """
    name = os.fspath(checkpoint_path)
    checkpoint = read_checkpoint(name, trust_checkpoint=trust_checkpoint)
    chosen = _choose_family(checkpoint, family, name)
    defaults = chosen.default_arch()
    unknown = sorted(set(arch) - set(defaults))
    if unknown:
        raise UserError(f"architecture option(s) {', '.join(unknown)} do not exist for family {chosen.name}: "
                        f"use {', '.join(defaults)}")
    resolved = {**defaults, **chosen.arch_from_checkpoint(checkpoint), **arch}
    if DEMO_MARKER in checkpoint:
        log.warning("checkpoint %s is a demo checkpoint: %s", name, checkpoint[DEMO_MARKER])
    # On the meta device the model has shapes but no memory: the checkpoint's tensors become its weights.
    with torch.device("meta"):
        model = chosen.build(**resolved)
    state_dict = normalise_state_dict(chosen.state_dict_from_checkpoint(checkpoint))
    load_state_dict_strictly(model, state_dict, name)
    model.eval()
    model.requires_grad_(False)
    model.family = chosen
    model.arch = resolved
    model.trained_on = chosen.trained_on(checkpoint, name)
    return model


def make_demo_checkpoint(path: str | os.PathLike, family: str | Family = "v2", size: str = "small",
                         seed: int = 0) -> None:
    """Write seeded random weights in the family's published checkpoint layout (meaningless output).

    The same family, size and seed give the same bytes.
    """
    chosen = get_family(family)
    arch = chosen.demo_arch(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = chosen.build(**arch)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = chosen.checkpoint_payload(state_dict, arch)
    payload[DEMO_MARKER] = (f"seeded random weights (family {chosen.name}, size {size}, seed {seed}): "
                            "the embeddings are meaningless")
    # Serialise in memory: torch names the archive after the file, and the file is a temporary name.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
