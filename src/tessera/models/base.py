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
                                 plus the raw day of year as the last channel; ``load_model``
                                 builds it on the meta device, so everything the forward pass
                                 reads must be a parameter or buffer in the state dict
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
import zipfile
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
    """Softmax-weighted sum of the tokens over time, scored by a learned linear layer (key
    ``query``) on the tokens; the families' poolings score other features of them (``scores``).

    As the reference: one step returns that token, no step returns zeros.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, 1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, 1) unnormalised weights of the tokens x (B, T, D)."""
        return self.query(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], x.shape[2])
        if x.shape[1] == 1:
            return x[:, 0]
        weights = torch.softmax(self.scores(x), dim=1)
        return (weights * x).sum(dim=1)


class TemporalBackbone(nn.Module):
    """One sensor's encoder: band embedding + DOY encoding → encoder stack → temporal pooling.

    ``forward`` takes the reference layout (B, T, bands + 1) with the raw day of year last;
    ``encode`` the bands (B, T, bands) and days of year (B, T) apart, as batches are prepared.
    Output (B, d_model). ``encoder`` and ``pooling`` are the family's modules, stored as
    ``transformer_encoder`` and ``attn_pool``.
    """

    def __init__(self, bands: int, d_model: int, encoder: nn.Module, pooling: nn.Module):
        super().__init__()
        self.d_model = d_model
        self.embedding = embedding_mlp(bands, d_model)
        self.transformer_encoder = encoder
        self.attn_pool = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x[..., :-1], x[..., -1])

    def encode(self, bands: torch.Tensor, doys: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(bands) + doy_encoding(doys, self.d_model)
        return self.attn_pool(self.transformer_encoder(tokens))


class ConcatFusionModel(nn.Module):
    """The reference encoder: both backbones, concatenated, through ``dim_reducer``.

    ``forward(s2_x, s1_x)`` is the reference's interface; ``encode`` takes each sensor's bands and
    days of year as separate tensors (what :class:`Batch` holds) and returns the same. Families that
    mix the two backbone outputs before concatenating (the v2 teacher) override ``fuse``.
    """

    def __init__(self, s2_backbone: nn.Module, s1_backbone: nn.Module, dim_reducer: nn.Module):
        super().__init__()
        self.s2_backbone = s2_backbone
        self.s1_backbone = s1_backbone
        self.dim_reducer = dim_reducer

    def forward(self, s2_x: torch.Tensor, s1_x: torch.Tensor) -> torch.Tensor:
        return self.encode(s2_x[..., :-1], s2_x[..., -1], s1_x[..., :-1], s1_x[..., -1])

    def encode(self, s2_bands: torch.Tensor, s2_doys: torch.Tensor, s1_bands: torch.Tensor,
               s1_doys: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.s2_backbone.encode(s2_bands, s2_doys), self.s1_backbone.encode(s1_bands, s1_doys))

    def fuse(self, s2_features: torch.Tensor, s1_features: torch.Tensor) -> torch.Tensor:
        """The output from the backbones' (B, D) outputs."""
        return self.dim_reducer(torch.cat([s2_features, s1_features], -1))


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


@dataclass
class Batch:
    """Model inputs for a group of pixels; ``pixels`` are flat (row · W + col) indices.

    Each pixel has ``repeats`` consecutive rows (independent draws whose outputs are averaged):
    bands (rows, T, C) standardised, days of year (rows, T) raw, as ``ConcatFusionModel.encode``
    takes them.
    """

    pixels: np.ndarray
    s2_bands: torch.Tensor
    s2_doys: torch.Tensor
    s1_bands: torch.Tensor
    s1_doys: torch.Tensor
    repeats: int = 1


class Family:
    """A TESSERA model family (see the module docstring for the contract of each member)."""

    name: str = ""
    description: str = ""
    quantisation: Quantisation
    # Top-level checkpoint keys that may hold the state dict, in order of preference.
    state_dict_keys: tuple[str, ...] = ()
    # Published sizes for demo checkpoints: {size: architecture overrides of default_arch()}.
    demo_sizes: Mapping[str, Mapping[str, Any]] = {"small": {}}
    # Whether precision "auto" runs this family under bf16 autocast on CUDA (criterion: tessera.infer).
    bf16_on_cuda: bool = False
    # Whether the embedding is Matryoshka-ordered: a prefix of its dimensions is usable alone.
    matryoshka: bool = False

    def default_arch(self) -> dict[str, Any]:
        raise NotImplementedError

    def arch_from_checkpoint(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def trained_on(self, checkpoint: Mapping[str, Any], path: str) -> str | None:
        """The data (``mpc`` or ``aws``) a checkpoint was trained on, for families with a checkpoint
        per data source; None when the family has one or the checkpoint does not say."""
        return None

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
        batch_pixels: int, repeat_times: int = 1, origin: tuple[int, int] = (0, 0),
        device: torch.device | None = None,
    ) -> Iterator[Batch]:
        """Model inputs of ``pixels`` (flat indices into the patch), in batches; with a ``device``,
        gathered on it (see :class:`SensorSource`)."""
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
# Gathering model inputs from a patch


@dataclass(frozen=True)
class SeriesPart:
    """One stretch of a sensor's time axis with its own z-score table (S1: one per orbit)."""

    values: np.ndarray  # (T, H, W, C) raw codes
    doys: np.ndarray  # (T,)
    valid: np.ndarray  # (T, H, W) bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


class SensorSource:
    """One sensor's series over a patch, in the order the models read it, ready for gathering.

    The parts are concatenated along time (S1: ascending, then descending). Model inputs for a
    group of pixels are gathered straight from the raw codes at the chosen time steps and
    standardised as the reference does, ``(float32(x) − mean) / (std + 1e-9)``, with the table of
    the part each step belongs to. Validity is kept pixel by pixel (H·W, T), so that a group's
    rows are one contiguous read each.

    With a ``device`` (a GPU), the codes, days of year and tables are copied there once and the
    gathering, casting and standardising run there: the CPU only chooses the time steps. Without
    one they run in numpy, which on a CPU is faster than torch (its uint16 cast has no fast path).
    """

    def __init__(self, parts: list[SeriesPart], device: torch.device | None = None):
        height, width, channels = parts[0].values.shape[1:]
        self.channels = channels
        self.pixel_count = height * width
        self.steps = sum(len(part.doys) for part in parts)
        self.values = _joined([part.values.reshape(-1, channels) for part in parts])  # (T · H·W, C)
        valid = _joined([part.valid.reshape(-1, self.pixel_count) for part in parts])  # (T, H·W)
        # torch transposes bytes several times faster than numpy's strided copy.
        self.valid = torch.from_numpy(valid.view(np.uint8)).t().contiguous().numpy().view(bool)  # (H·W, T)
        self.valid_counts = valid.sum(axis=0)  # (H·W,)
        self.doys = np.concatenate([np.asarray(part.doys, np.float32) for part in parts])
        # Distinct per step, and the same for the same date in another stack: (part, day of year,
        # how many earlier steps of the part share that day).
        keys = []
        for index, part in enumerate(parts):
            doys = np.asarray(part.doys, np.int64) & 0xFFFF
            occurrence = np.array([np.count_nonzero(doys[:t] == doy) for t, doy in enumerate(doys)], np.int64)
            keys.append((((index << 16) | doys) << 15) | occurrence)  # 32 bits: occurrence < 2^15 steps
        self.step_keys = np.concatenate(keys).astype(np.uint64)
        tables = {(part.mean, part.std) for part in parts}
        if len(tables) == 1:  # one table: a (C,) row for every step
            mean, std = tables.pop()
            self.mean = np.asarray(mean, np.float32)
            self.std = np.asarray(std, np.float32) + np.float32(1e-9)
        else:  # a (T, C) row per step
            self.mean = np.concatenate([np.tile(np.asarray(p.mean, np.float32), (len(p.doys), 1)) for p in parts])
            self.std = np.concatenate([np.tile(np.asarray(p.std, np.float32), (len(p.doys), 1)) for p in parts])
            self.std += np.float32(1e-9)
        self.device = device
        if device is not None:
            # uint16 has few torch kernels: the codes travel as int16 and are widened on the device.
            codes = self.values.view(np.int16) if self.values.dtype == np.uint16 else self.values
            self._device_codes = torch.from_numpy(np.ascontiguousarray(codes)).to(device)
            self._unsigned = self.values.dtype == np.uint16
            self._device_doys = torch.from_numpy(self.doys).to(device)
            self._device_mean = torch.from_numpy(self.mean).to(device)
            self._device_std = torch.from_numpy(self.std).to(device)

    def valid_rows(self, group: np.ndarray) -> np.ndarray:
        """(G, T) bool: which steps of each pixel of ``group`` are valid observations."""
        return np.take(self.valid, group, axis=0)

    def inputs(self, group: np.ndarray, steps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised bands (G, L, C) and raw days of year (G, L), float32, at ``steps`` (G, L)."""
        rows, length = steps.shape
        if not self.steps:
            return (torch.zeros(rows, length, self.channels, device=self.device),
                    torch.zeros(rows, length, device=self.device))
        flat = np.multiply(steps, self.pixel_count)
        flat += group[:, None]
        if self.device is not None:
            return self._inputs_on_device(flat, steps)
        # numpy's cast of uint16 is about 3x torch's (which has no fast uint16 path).
        raw = np.take(self.values, flat, axis=0).astype(np.float32)
        # (G, L · C) operands, so that every pass runs along whole rows rather than C values at a time.
        bands = torch.from_numpy(raw).view(rows, -1)
        if self.mean.ndim == 1:
            mean, std = np.tile(self.mean, length), np.tile(self.std, length)
        else:
            mean, std = np.take(self.mean, steps, axis=0), np.take(self.std, steps, axis=0)
        bands.sub_(torch.from_numpy(mean).view(-1, bands.shape[1])).div_(torch.from_numpy(std).view(-1, bands.shape[1]))
        return bands.view(rows, length, self.channels), torch.from_numpy(np.take(self.doys, steps))

    def _inputs_on_device(self, flat: np.ndarray, steps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs`` gathered on ``self.device`` (same values, bit for bit)."""
        rows, length = steps.shape
        flat_t = torch.from_numpy(flat.reshape(-1)).to(self.device, non_blocking=True)
        steps_t = torch.from_numpy(steps).to(self.device, non_blocking=True)
        codes = self._device_codes.index_select(0, flat_t).to(torch.int32)
        if self._unsigned:
            codes = codes & 0xFFFF
        bands = codes.to(torch.float32).view(rows, length, self.channels)
        if self._device_mean.ndim == 1:
            mean, std = self._device_mean, self._device_std
        else:
            mean, std = self._device_mean[steps_t], self._device_std[steps_t]
        bands.sub_(mean).div_(std)
        return bands, self._device_doys[steps_t]


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays concatenated along the first axis; a single array is not copied."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _either_channel_set(sar: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: VV or VH non-zero, read as one 32-bit word per pixel and step."""
    return np.ascontiguousarray(sar, np.int16).view(np.int32)[..., 0] != 0


class S2Source(SensorSource):
    """S2 bands, valid where the mask is non-zero."""

    def __init__(self, arrays: Mapping[str, np.ndarray], norm: Normalisation, device: torch.device | None = None):
        super().__init__([SeriesPart(arrays["bands"], arrays["doys"], np.asarray(arrays["masks"]) != 0,
                                     norm.s2_mean, norm.s2_std)], device)


class S1Source(SensorSource):
    """S1 ascending then descending [VV, VH] codes, valid where either is non-zero, z-scored per orbit."""

    def __init__(self, arrays: Mapping[str, np.ndarray], norm: Normalisation, device: torch.device | None = None):
        orbits = (("sar_ascending", norm.s1_asc_mean, norm.s1_asc_std),
                  ("sar_descending", norm.s1_desc_mean, norm.s1_desc_std))
        super().__init__([
            SeriesPart(arrays[name], arrays[f"{name}_doy"], _either_channel_set(arrays[name]), mean, std)
            for name, mean, std in orbits
        ], device)


# ---------------------------------------------------------------------------------------------
# Bucketed all-observation sampling (v1.1, v2)


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
    of at most :func:`pixels_per_batch` pixels. The selection is deterministic: ``seed`` and
    ``origin`` play no part, and ``repeat_times`` must be 1.
    """

    def bins(self, counts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pattern(self, n_valid: int, length: int) -> np.ndarray:
        """Indices into a pixel's ``n_valid`` chronological valid steps, ``length`` of them."""
        raise NotImplementedError

    def normalisation(self, data_source: str) -> Normalisation:
        raise NotImplementedError

    def prepare_batches(self, arrays, pixels, *, data_source, seed, batch_pixels, repeat_times=1, origin=(0, 0),
                        device=None):
        if repeat_times != 1:
            raise UserError(f"repeat_times = {repeat_times}, but family {self.name} selects time steps "
                            "deterministically, so every draw would be the same: set repeat_times to 1")
        norm = self.normalisation(data_source)
        s2, s1 = S2Source(arrays, norm, device), S1Source(arrays, norm, device)
        pixels = np.asarray(pixels, np.int64)
        n_s2, n_s1 = s2.valid_counts[pixels], s1.valid_counts[pixels]
        has_data = (n_s2 > 0) | (n_s1 > 0)
        pixels, n_s2, n_s1 = pixels[has_data], n_s2[has_data], n_s1[has_data]
        bin_s2, bin_s1 = self.bins(n_s2), self.bins(n_s1)
        order = np.lexsort((bin_s1, bin_s2))  # stable: pixels stay in row-major order within a bucket
        keys = np.stack([bin_s2[order], bin_s1[order]], axis=1)
        starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)]) if len(order) else np.array([], int)
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends):
            length_s2, length_s1 = max(int(keys[start, 0]), 1), max(int(keys[start, 1]), 1)
            step = pixels_per_batch(batch_pixels, max(length_s2, length_s1))
            for chunk in range(start, end, step):
                members = order[chunk:min(chunk + step, end)]
                group = pixels[members]
                s2_bands, s2_doys = self.resampled(s2, group, n_s2[members], length_s2)
                s1_bands, s1_doys = self.resampled(s1, group, n_s1[members], length_s1)
                yield Batch(group, s2_bands, s2_doys, s1_bands, s1_doys)

    def resampled(self, source: SensorSource, group: np.ndarray, counts: np.ndarray,
                  length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bands (G, length, C) and DOYs (G, length) of ``group``, whose valid-step ``counts`` are given."""
        if not counts.any():
            return (torch.zeros(len(group), length, source.channels, device=source.device),
                    torch.zeros(len(group), length, device=source.device))
        table = _pattern_table(self.pattern, int(counts.max()), length)  # (n_max + 1, length)
        steps = nth_set_steps(source.valid_rows(group), counts, np.take(table, counts, axis=0))
        bands, doys = source.inputs(group, steps)
        if not counts.all():
            empty = torch.from_numpy(counts == 0).to(bands.device)
            bands[empty] = 0.0
            doys[empty] = 0.0
        return bands, doys


def nth_set_steps(mask: np.ndarray, counts: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """(G, L) time indices: in row g of ``mask`` (G, T), the ``ranks[g]``-th set steps in time order.

    ``counts`` are the rows' numbers of set steps (ranks below them); a row without any gets step 0.
    """
    rows, steps = mask.shape
    set_flat = np.flatnonzero(mask)  # row · T + t of every set entry, row by row
    if not len(set_flat):
        return np.zeros((rows, ranks.shape[1]), np.int64)
    positions = ranks + (np.cumsum(counts) - counts)[:, None]
    # "clip": a row without set steps may point one past the end; its result is overwritten.
    picked = np.take(set_flat, positions, mode="clip")
    picked -= np.arange(0, rows * steps, steps)[:, None]
    if not counts.all():
        picked[counts == 0] = 0
    return picked


def _pattern_table(pattern: Callable[[int, int], np.ndarray], n_max: int, length: int) -> np.ndarray:
    """Row n = ``pattern(n, length)``; row 0 (no valid step) points at step 0 and is zeroed later."""
    return np.stack([np.zeros(length, np.int64)]
                    + [_cached_pattern(pattern, n, length) for n in range(1, n_max + 1)])


@functools.lru_cache(maxsize=8192)
def _cached_pattern(pattern: Callable[[int, int], np.ndarray], n_valid: int, length: int) -> np.ndarray:
    indices = np.asarray(pattern(n_valid, length), np.int64)
    indices.setflags(write=False)
    return indices
