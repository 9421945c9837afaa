"""The interface every TESSERA model family implements, and the building blocks they share.

A family is one file in ``tessera/models/`` that defines a subclass of :class:`Family` and exposes
an instance as ``FAMILY``; the registry in ``tessera/models/__init__.py`` lists it with one line.
Everything family-specific lives on that object, so loading, inference and quantisation never
branch on family names:

===============================  =================================================================
``name``                         registry name used in configs and on the CLI (``"v2"``, ``"v1.1"``)
``default_arch()``               architecture keyword arguments of the published full-size model
``arch_from_checkpoint(ckpt)``   the architecture a checkpoint records (v2 ``args``, v1.1
                                 ``config``); only keys that ``default_arch()`` knows, ``{}`` if none
``state_dict_from_checkpoint``   the raw state dict inside the loaded checkpoint dict, or ``None``
                                 when the checkpoint does not have this family's layout
``matches_keys(keys)``           True when the (normalised, see :func:`normalise_state_dict`)
                                 state-dict keys are this family's; used to detect the family
``build(**arch)``                the encoder only (no training projector) as an ``nn.Module`` whose
                                 ``forward(s2_x, s1_x)`` returns what the reference model returns,
                                 with ``s2_x`` (B, T, 11) and ``s1_x`` (B, T, 3): standardised bands
                                 plus the raw day of year as the last channel
``embedding_dim(arch)``          length of the stored embedding
``stored_embedding(out, arch)``  the stored embedding from the model output (v1.1 keeps a prefix)
``quantisation``                 a :class:`Quantisation` (int8 code range and scale floor)
``prepare_batches(...)``         the family's time-step selection and normalisation: yields
                                 :class:`Batch` es of (flat pixel indices, s2_x, s1_x); a pixel that
                                 is never yielded is no-data
``demo_arch(size)``              architecture of a demo checkpoint of a published size
``checkpoint_payload(sd, arch)`` the published top-level checkpoint layout around a state dict
===============================  =================================================================

Families whose sampling is the bucketed all-observation scheme (v1.1, v2) get ``prepare_batches``
from :class:`BucketedFamily` and only declare their bins, resampling pattern and normalisation.

Shared modules (their attribute names are the checkpoint key names, so keep them):
:func:`embedding_mlp`, :func:`doy_encoding`, :class:`AttentionPooling`, :class:`TemporalBackbone`,
:class:`ConcatFusionModel`.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.errors import UserError

# Training-only heads that published checkpoints carry and inference never uses.
TRAINING_ONLY_PREFIXES = ("projector.", "segmented_matryoshka_projector.")
# torch.compile wraps the model and prefixes every key with this.
COMPILED_PREFIX = "_orig_mod."

REFERENCE_ARRAY_NAMES = (
    "bands", "masks", "doys",
    "sar_ascending", "sar_ascending_doy", "sar_descending", "sar_descending_doy",
)


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def read_checkpoint(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> dict:
    """The top-level dict of a checkpoint file, loaded with ``weights_only`` unless trusted.

    ``argparse.Namespace`` is allowed in safe mode: training scripts store hyper-parameters that
    way and it carries nothing but attributes.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise UserError(f"checkpoint {name!r} does not exist: check the model checkpoint path")
    try:
        if trust_checkpoint:
            checkpoint = torch.load(name, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(name, map_location="cpu", weights_only=True)
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
    """Load every key, refusing missing or unexpected keys and wrong shapes with a UserError."""
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
    model.load_state_dict(state_dict, strict=True)


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


# ---------------------------------------------------------------------------------------------
# Shared model building blocks


def embedding_mlp(bands: int, d_model: int) -> nn.Sequential:
    """Per-time-step band embedding: Linear → ReLU → Linear (keys ``embedding.0``, ``embedding.2``)."""
    return nn.Sequential(nn.Linear(bands, d_model), nn.ReLU(), nn.Linear(d_model, d_model))


def doy_encoding(doy: torch.Tensor, d_model: int) -> torch.Tensor:
    """Sinusoidal encoding of the raw day of year: sin at even, cos at odd channels.

    Frequencies ``exp(2k · −ln(10000)/d_model)``, the standard transformer table evaluated at the
    day-of-year value instead of a sequence position.
    """
    frequencies = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=doy.device) * (-math.log(10000.0) / d_model)
    )
    angles = doy.to(torch.float32).unsqueeze(-1) * frequencies
    encoding = torch.empty(*doy.shape, d_model, dtype=torch.float32, device=doy.device)
    encoding[..., 0::2] = torch.sin(angles)
    encoding[..., 1::2] = torch.cos(angles)
    return encoding


class AttentionPooling(nn.Module):
    """Softmax-weighted sum over time with a learned linear score (key ``query``)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], x.shape[2])
        if x.shape[1] == 1:
            return x[:, 0]
        weights = torch.softmax(self.query(x), dim=1)
        return (weights * x).sum(dim=1)


class TemporalBackbone(nn.Module):
    """One sensor's encoder: band embedding + DOY encoding → encoder stack → temporal pooling.

    Input (B, T, bands + 1) with the raw day of year last; output (B, d_model). ``encoder`` and
    ``pooling`` are the family's modules, stored as ``transformer_encoder`` and ``attn_pool``.
    """

    def __init__(self, bands: int, d_model: int, encoder: nn.Module, pooling: nn.Module):
        super().__init__()
        self.d_model = d_model
        self.embedding = embedding_mlp(bands, d_model)
        self.transformer_encoder = encoder
        self.attn_pool = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(x[..., :-1]) + doy_encoding(x[..., -1], self.d_model)
        return self.attn_pool(self.transformer_encoder(tokens))


class ConcatFusionModel(nn.Module):
    """The reference encoder: both backbones, concatenated, through ``dim_reducer``."""

    def __init__(self, s2_backbone: nn.Module, s1_backbone: nn.Module, dim_reducer: nn.Module):
        super().__init__()
        self.s2_backbone = s2_backbone
        self.s1_backbone = s1_backbone
        self.dim_reducer = dim_reducer

    def forward(self, s2_x: torch.Tensor, s1_x: torch.Tensor) -> torch.Tensor:
        return self.dim_reducer(torch.cat([self.s2_backbone(s2_x), self.s1_backbone(s1_x)], dim=-1))


# ---------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class Quantisation:
    """Per-pixel symmetric int8: ``scale = max|e| / 127``, ``code = clip(round_half_even(e / scale))``.

    ``scale_floor`` keeps the scale positive; ``floor_on_absmax`` says where the reference applies
    it (v2 floors max|e| before dividing, v1.x floors the scale itself).
    """

    code_min: int
    code_max: int
    scale_floor: float
    floor_on_absmax: bool


@dataclass(frozen=True)
class Normalisation:
    """``(x − mean) / (std + 1e-9)`` per band; S1 ascending and descending can differ."""

    s2_mean: tuple[float, ...]
    s2_std: tuple[float, ...]
    s1_asc_mean: tuple[float, float]
    s1_asc_std: tuple[float, float]
    s1_desc_mean: tuple[float, float]
    s1_desc_std: tuple[float, float]


def standardise(values: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 z-scores with the reference's ``std + 1e-9`` denominator."""
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32) + np.float32(1e-9)
    return (values.astype(np.float32) - mean32) / std32


@dataclass
class Batch:
    """Model inputs for a group of pixels; ``pixels`` are flat (row · W + col) indices."""

    pixels: np.ndarray
    s2_x: torch.Tensor
    s1_x: torch.Tensor


class Family:
    """A TESSERA model family (see the module docstring for the contract of each member)."""

    name: str = ""
    description: str = ""
    quantisation: Quantisation
    # Top-level checkpoint keys that may hold the state dict, in order of preference.
    state_dict_keys: tuple[str, ...] = ()
    # Published sizes for demo checkpoints: {size: architecture overrides of default_arch()}.
    demo_sizes: Mapping[str, Mapping[str, Any]] = {"small": {}}

    def default_arch(self) -> dict[str, Any]:
        raise NotImplementedError

    def arch_from_checkpoint(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def state_dict_from_checkpoint(self, checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
        for key in self.state_dict_keys:
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
        return None

    def matches_keys(self, keys: set[str]) -> bool:
        raise NotImplementedError

    def build(self, **arch: Any) -> nn.Module:
        raise NotImplementedError

    def embedding_dim(self, arch: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def stored_embedding(self, output: torch.Tensor, arch: Mapping[str, Any]) -> torch.Tensor:
        return output

    def prepare_batches(
        self, arrays: Mapping[str, np.ndarray], pixels: np.ndarray, *, data_source: str, seed: int,
        batch_pixels: int,
    ) -> Iterator[Batch]:
        raise NotImplementedError

    def demo_arch(self, size: str) -> dict[str, Any]:
        if size not in self.demo_sizes:
            raise UserError(f"demo checkpoint size {size!r} is not one of {sorted(self.demo_sizes)} "
                            f"for family {self.name}: pick one of those")
        return {**self.default_arch(), **self.demo_sizes[size]}

    def checkpoint_payload(self, state_dict: dict[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"


# ---------------------------------------------------------------------------------------------
# Bucketed all-observation sampling (v1.1, v2)


def flatten_pixels(array: np.ndarray) -> np.ndarray:
    """(T, H, W, ...) → (T, H·W, ...) view, pixels in row-major order."""
    return array.reshape(array.shape[0], array.shape[1] * array.shape[2], *array.shape[3:])


def s1_valid_counts(asc: np.ndarray, desc: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Valid S1 steps per pixel: VV or VH non-zero in the raw codes, both orbits together."""
    count = np.zeros(len(pixels), np.int64)
    for sar in (asc, desc):
        if sar.shape[0]:
            count += (flatten_pixels(sar)[:, pixels] != 0).any(axis=-1).sum(axis=0)
    return count


# ``batch_pixels`` counts pixels of up to this many time steps; longer buckets get proportionally
# fewer pixels per batch, so that activation memory does not grow with the number of observations.
STEPS_PER_BATCH_PIXEL = 64


def pixels_per_batch(batch_pixels: int, steps: int) -> int:
    """Pixels per batch for sequences of ``steps`` time steps (at least one)."""
    return max(1, min(batch_pixels, batch_pixels * STEPS_PER_BATCH_PIXEL // steps))


class BucketedFamily(Family):
    """Families that feed every valid observation, resampled to a per-pixel bin length.

    Per pixel and sensor: the valid time steps (S2: mask ≠ 0; S1: VV or VH ≠ 0 on the raw codes,
    ascending then descending) in chronological order, standardised (S1 per orbit), resampled by
    ``pattern(n, length)`` to ``length = max(bin, 1)`` steps. A sensor without valid steps gets
    ``length`` all-zero rows (DOY 0 too); a pixel without valid steps in either sensor is no-data.
    Pixels are grouped by (s2 bin, s1 bin) and each group gathered with index arrays, in batches
    of at most :func:`pixels_per_batch` pixels.
    """

    def bins(self, counts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pattern(self, n_valid: int, length: int) -> np.ndarray:
        """Indices into a pixel's ``n_valid`` chronological valid steps, ``length`` of them."""
        raise NotImplementedError

    def normalisation(self, data_source: str) -> Normalisation:
        raise NotImplementedError

    def prepare_batches(self, arrays, pixels, *, data_source, seed, batch_pixels):
        norm = self.normalisation(data_source)
        pixels = np.asarray(pixels, np.int64)
        masks, asc, desc = arrays["masks"], arrays["sar_ascending"], arrays["sar_descending"]
        n_s2 = (flatten_pixels(masks)[:, pixels] != 0).sum(axis=0) if masks.shape[0] else np.zeros(len(pixels), np.int64)
        n_s1 = s1_valid_counts(asc, desc, pixels)
        has_data = (n_s2 > 0) | (n_s1 > 0)
        pixels, n_s2, n_s1 = pixels[has_data], n_s2[has_data], n_s1[has_data]
        bin_s2, bin_s1 = self.bins(n_s2), self.bins(n_s1)
        order = np.lexsort((bin_s1, bin_s2))
        keys = np.stack([bin_s2[order], bin_s1[order]], axis=1)
        starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)]) if len(order) else np.array([], int)
        ends = np.r_[starts[1:], len(order)]
        s2_source = _S2Source(arrays, norm)
        s1_source = _S1Source(arrays, norm)
        for start, end in zip(starts, ends):
            length_s2, length_s1 = max(int(keys[start, 0]), 1), max(int(keys[start, 1]), 1)
            step = pixels_per_batch(batch_pixels, max(length_s2, length_s1))
            for chunk in range(start, end, step):
                members = order[chunk:min(chunk + step, end)]
                group = pixels[members]
                yield Batch(
                    pixels=group,
                    s2_x=torch.from_numpy(s2_source.gather(group, n_s2[members], length_s2, self.pattern)),
                    s1_x=torch.from_numpy(s1_source.gather(group, n_s1[members], length_s1, self.pattern)),
                )


class _SensorSource:
    """One sensor's series for gathering: raw values (T, H·W, C), validity, DOYs, z-score stats."""

    values: list[np.ndarray]
    doys: np.ndarray
    means: list[tuple[float, ...]]
    stds: list[tuple[float, ...]]

    def valid(self, group: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def gather(self, group: np.ndarray, counts: np.ndarray, length: int,
               pattern: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """(G, length, C + 1) float32 inputs for ``group`` (all in one bucket)."""
        channels = self.values[0].shape[-1]
        out = np.zeros((len(group), length, channels + 1), np.float32)
        if not counts.any():
            return out
        valid = self.valid(group)  # (T, G)
        # Valid steps first, each block in chronological (stack) order.
        steps = np.argsort(~valid, axis=0, kind="stable").T  # (G, T)
        table = _pattern_table(pattern, int(counts.max()), length)  # (n_max + 1, length)
        picked = np.take_along_axis(steps, table[counts], axis=1)  # (G, length) time indices
        columns = np.broadcast_to(np.arange(len(group))[:, None], picked.shape)
        series = self.standardised_series(group)  # (T, G, C)
        out[..., :channels] = series[picked, columns]
        out[..., channels] = self.doys[picked]
        out[counts == 0] = 0.0
        return out

    def standardised_series(self, group: np.ndarray) -> np.ndarray:
        parts = [standardise(v[:, group], m, s) for v, m, s in zip(self.values, self.means, self.stds)]
        return np.concatenate(parts, axis=0)


class _S2Source(_SensorSource):
    def __init__(self, arrays: Mapping[str, np.ndarray], norm: Normalisation):
        self.values = [flatten_pixels(arrays["bands"])]
        self.masks = flatten_pixels(arrays["masks"])
        self.doys = np.asarray(arrays["doys"], np.float32)
        self.means, self.stds = [norm.s2_mean], [norm.s2_std]

    def valid(self, group):
        return self.masks[:, group] != 0


class _S1Source(_SensorSource):
    def __init__(self, arrays: Mapping[str, np.ndarray], norm: Normalisation):
        self.values = [flatten_pixels(arrays["sar_ascending"]), flatten_pixels(arrays["sar_descending"])]
        self.doys = np.concatenate([np.asarray(arrays["sar_ascending_doy"], np.float32),
                                    np.asarray(arrays["sar_descending_doy"], np.float32)])
        self.means, self.stds = [norm.s1_asc_mean, norm.s1_desc_mean], [norm.s1_asc_std, norm.s1_desc_std]

    def valid(self, group):
        return np.concatenate([(v[:, group] != 0).any(axis=-1) for v in self.values], axis=0)


def _pattern_table(pattern: Callable[[int, int], np.ndarray], n_max: int, length: int) -> np.ndarray:
    """Row n = ``pattern(n, length)``; row 0 (no valid step) points at step 0 and is zeroed later."""
    return np.stack([np.zeros(length, np.int64)]
                    + [_cached_pattern(pattern, n, length) for n in range(1, n_max + 1)])


@functools.lru_cache(maxsize=8192)
def _cached_pattern(pattern: Callable[[int, int], np.ndarray], n_valid: int, length: int) -> np.ndarray:
    indices = np.asarray(pattern(n_valid, length), np.int64)
    indices.setflags(write=False)
    return indices
