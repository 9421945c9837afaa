"""Checkpoint files: reading them safely, loading them strictly into a family's encoder, and
writing demo checkpoints.

Safety: a checkpoint is loaded with ``weights_only`` unless the user trusts it, and its zip CRC-32s
are checked first (``torch.load`` does not check them). Strictness: every key of the family's
encoder must be present with its shape, and nothing else, once ``_orig_mod.`` is stripped and the
training-only heads are dropped.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tessera.errors import UserError
from tessera.io import atomic_path, sha256_file
from tessera.models import all_families, get_family
from tessera.models.family import Family

log = logging.getLogger(__name__)

# Top-level key that marks demo checkpoints, so that nobody mistakes their output for embeddings.
DEMO_MARKER = "tessera_demo"


# Training-only heads that published checkpoints carry and inference never uses.
TRAINING_ONLY_PREFIXES = ("projector.", "segmented_matryoshka_projector.")
# torch.compile wraps the model and prefixes every key with this.
COMPILED_PREFIX = "_orig_mod."




def read_checkpoint(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> dict:
    """The top-level dict of a checkpoint file, loaded with ``weights_only`` unless trusted.

    ``argparse.Namespace`` is allowed in safe mode: training scripts store hyper-parameters that
    way and it carries nothing but attributes.

    Files in torch's zip format (everything torch has written since 1.6) are memory-mapped: the
    tensors are views of the file's pages, read when first used, so a model that takes them over
    (see :func:`load_state_dict_strictly`) holds its weights once, not once more in a read copy
    (an 8 GB teacher would otherwise need 16 GB). Legacy files cannot be mapped and are read.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise UserError(f"checkpoint {name!r} does not exist: check the model checkpoint path")
    mappable = _check_zip_crcs(name)
    try:
        if trust_checkpoint:
            checkpoint = torch.load(name, map_location="cpu", weights_only=False, mmap=mappable)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(name, map_location="cpu", weights_only=True, mmap=mappable)
    except pickle.UnpicklingError as error:
        if trust_checkpoint:
            raise UserError(f"checkpoint {name!r} is not a PyTorch checkpoint ({_first_line(error)}): "
                            "check the file") from None
        raise UserError(f"checkpoint {name!r} holds more than tensors ({_unsafe_reason(error)}): if you "
                        "trust its source, rerun with --trust-checkpoint") from None
    except Exception as error:  # torch reports damaged files as RuntimeError, KeyError, EOFError ...
        raise UserError(f"checkpoint {name!r} is truncated or not a PyTorch checkpoint "
                        f"({type(error).__name__}: {_first_line(error)}): download it again") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {name!r} holds a {type(checkpoint).__name__}, not a dict of weights: "
                        "use a TESSERA checkpoint")
    return checkpoint


def _check_zip_crcs(name: str) -> bool:
    """Refuse a checkpoint whose zip entries fail their CRC-32: torch.load does not check them, so
    a flipped byte in a tensor would load as a wrong weight. True for a sound zip file, False for
    a file in torch's legacy, non-zip format (which carries no checksum to check)."""
    if not zipfile.is_zipfile(name):
        return False
    try:
        with zipfile.ZipFile(name) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        problem = _first_line(error)
    else:
        if damaged is None:
            return True
        problem = f"entry {damaged} fails its CRC-32"
    raise UserError(f"checkpoint {name!r} is damaged ({problem}): download it again")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def _unsafe_reason(error: pickle.UnpicklingError) -> str:
    for line in str(error).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")[:200]
    return "objects other than tensors"


def normalise_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as the encoder expects them: ``_orig_mod.`` removed, training-only heads dropped."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace(COMPILED_PREFIX, "")
        if not key.startswith(TRAINING_ONLY_PREFIXES):
            out[key] = value
    return out


def load_state_dict_strictly(model: nn.Module, state_dict: Mapping[str, Any], checkpoint_name: str) -> None:
    """Load every key, refusing missing or unexpected keys and wrong shapes with a UserError.

    The model takes the checkpoint's tensors over rather than copying them (``assign``), so it can
    be built on the meta device without memory of its own and a memory-mapped checkpoint is not
    duplicated; tensors of another dtype than the model's are converted (those alone are copied).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise UserError(f"checkpoint {checkpoint_name!r} does not fit the model ({'; '.join(parts)}): use a "
                        "checkpoint of this family, or override the architecture (latent_dim, num_layers, ...)")
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"checkpoint {checkpoint_name!r} entry {key!r} is a {type(tensor).__name__}, "
                            "not a tensor: use a TESSERA checkpoint")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"checkpoint {checkpoint_name!r} entry {key!r} has shape {tuple(tensor.shape)}, the "
                            f"model expects {tuple(expected[key].shape)}: the architecture arguments do not "
                            "match this checkpoint")
    converted = {key: tensor if tensor.dtype == expected[key].dtype else tensor.to(expected[key].dtype)
                 for key, tensor in state_dict.items()}
    model.load_state_dict(converted, strict=True, assign=True)


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a checkpoint file, recorded with every output."""
    return sha256_file(path)


def matching_families(checkpoint: dict) -> list[Family]:
    """Families whose checkpoint layout and state-dict keys the checkpoint has."""
    found = []
    for family in all_families():
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
