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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.errors import UserError
from tessera.models.quantisation import Quantisation


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
    # Whether precision "auto" runs this family under bf16 autocast on CUDA: as the reference runs it.
    bf16_on_cuda: bool = False
    # Whether the embedding is Matryoshka-ordered: a prefix of its dimensions is usable alone.
    matryoshka: bool = False
    # Pixels per batch at most, whatever infer.batch_pixels says: a model whose activations per
    # pixel are large (the 2B teacher) would otherwise exhaust a CPU's memory at the default.
    max_batch_pixels: int = 1 << 30

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
        self, arrays: Mapping[str, np.ndarray], pixels: np.ndarray, *, data_kind: str, seed: int,
        batch_pixels: int, repeat_times: int = 1, origin: tuple[int, int] = (0, 0),
        device: torch.device | None = None,
    ) -> Iterator[Batch]:
        """Model inputs of ``pixels`` (flat indices into the patch), in batches; with a ``device``,
        gathered on it (see :class:`SensorSeries`)."""
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
