"""TESSERA v1.0 "early" fp32 model, and the 40 + 40 random time-step sampling of the v1.0 families.

Two backbones (S2: 10 bands, S1: VV, VH) of d_model = 4 · latent_dim: band embedding + sinusoidal
DOY encoding, a post-LN ``nn.TransformerEncoder`` (8 layers, 8 heads, FFN 4096 at full size), and
GRU-guided attention pooling; the two 512-d outputs are concatenated into ``dim_reducer``
= Linear(1024 → 128). Checkpoints keep the state dict under ``model_state`` or
``model_state_dict`` and carry the training projector, which is dropped (UPSTREAM.md §4.2–4.5).

Inputs: per pixel and sensor 40 time steps drawn uniformly from the valid ones (with replacement
only when fewer than 40 are valid; from all steps when none is), in chronological order, S1 as
the ascending block followed by the descending block. The reference draws with an unseeded global
generator; here every draw is a function of (seed, pixel, repeat), so reruns are identical and a
pixel's input does not depend on which other pixels are embedded with it or on the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.errors import UserError
from tessera.models.base import (
    Batch,
    ConcatFusionModel,
    Family,
    Normalisation,
    Quantisation,
    TemporalBackbone,
    _S1Source,
    _S2Source,
    _SensorSource,
)

STEPS_PER_SENSOR = 40

# One table for both orbits: v1.0 standardises the pooled S1 series (UPSTREAM.md §4.5).
V1_0_NORMALISATION = Normalisation(
    s2_mean=(1711.0938, 1308.8511, 1546.4543, 3010.1293, 3106.5083, 2068.3044, 2685.0845, 2931.5889,
             2514.6928, 1899.4922),
    s2_std=(1926.1026, 1862.9751, 1803.1792, 1741.7837, 1677.4543, 1888.7862, 1736.3090, 1715.8104,
            1514.5199, 1398.4779),
    s1_asc_mean=(5484.0407, 3003.7812),
    s1_asc_std=(1871.2334, 1726.0670),
    s1_desc_mean=(5484.0407, 3003.7812),
    s1_desc_std=(1871.2334, 1726.0670),
)

# v1.x per-pixel int8: codes in [-128, 127], the scale itself floored at 1e-8 (UPSTREAM.md §4.8).
V1_QUANTISATION = Quantisation(code_min=-128, code_max=127, scale_floor=1e-8, floor_on_absmax=False)

# Reduced size for demo checkpoints: v1.x was published at one size only, which is too slow on a
# CPU for trying the workflow; "full" is the published size.
V1_DEMO_SIZES = {"small": {"latent_dim": 64, "nhead": 4, "num_layers": 4, "dim_feedforward": 1024}, "full": {}}


def transformer_stack(d_model: int, nhead: int, num_layers: int, dim_feedforward: int) -> nn.TransformerEncoder:
    """The reference's post-LN ``nn.TransformerEncoder`` (ReLU, batch first, no final norm).

    Dropout is 0: the models are only ever evaluated.
    """
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class GRUAttentionPooling(nn.Module):
    """Softmax weights scored on a GRU's outputs, applied to the GRU's *inputs* (the tokens)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.temporal_context = nn.GRU(d_model, d_model, batch_first=True)
        self.query = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, _ = self.temporal_context(x)
        weights = torch.softmax(self.query(context), dim=1)
        return (weights * x).sum(dim=1)


# CPU matmuls over fewer than 12 rows take kernels that round differently; the recurrent pooling
# runs one matmul of B rows per time step. Padding batches to a multiple of 8 rows keeps a pixel's
# embedding bit-identical whatever its batch (checked for 1..600 rows on MKL).
BATCH_ROW_MULTIPLE = 8


class V1Model(ConcatFusionModel):
    """The reference encoder, batch-size invariant, also taking (B, R, T, C): R draws averaged.

    The R draws are the reference's ``repeat_times``; 3-D inputs are a single draw.
    """

    def forward(self, s2_x: torch.Tensor, s1_x: torch.Tensor) -> torch.Tensor:
        if s2_x.dim() == 4:
            pixels, repeats = s2_x.shape[:2]
            output = self.forward(s2_x.flatten(0, 1), s1_x.flatten(0, 1))
            return output.view(pixels, repeats, -1).mean(dim=1)
        rows = s2_x.shape[0]
        padding = -rows % BATCH_ROW_MULTIPLE
        if padding:
            s2_x = torch.cat([s2_x, s2_x.new_zeros(padding, *s2_x.shape[1:])])
            s1_x = torch.cat([s1_x, s1_x.new_zeros(padding, *s1_x.shape[1:])])
        return super().forward(s2_x, s1_x)[:rows]


# ---------------------------------------------------------------------------------------------
# Counter-based uniforms: a pure function of (seed, stream, pixel, slot), computed for whole
# arrays at once. A sequential generator would tie a pixel's draws to its position in the run.

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_U64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose outputs look independent."""
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, stream: int, pixels: np.ndarray, slots: int) -> np.ndarray:
    """float64 (len(pixels), slots) in [0, 1), each entry fixed by (seed, stream, pixel, slot)."""
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(seed & _U64) * _GOLDEN_GAMMA + _mix64(np.uint64(stream & _U64)))
        per_pixel = _mix64(key ^ (pixels.astype(np.uint64) * _GOLDEN_GAMMA))
        bits = _mix64(per_pixel[:, None] + np.arange(1, slots + 1, dtype=np.uint64) * _GOLDEN_GAMMA)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_steps(valid: np.ndarray, subset_keys: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """(P, k) chronological time indices, k = picks.shape[1], drawn as the reference does.

    ``valid`` (P, T): candidates are a pixel's valid steps, or all steps when it has none. With at
    least k candidates, the k with the smallest ``subset_keys`` (P, T) (a uniform k-subset, i.e.
    without replacement); with fewer, ``floor(picks · n)``-th candidates (uniform, with
    replacement). Sorted ascending.
    """
    count = picks.shape[1]
    candidates = valid | ~valid.any(axis=1, keepdims=True)
    n_candidates = candidates.sum(axis=1, keepdims=True)
    chronological = np.argsort(~candidates, axis=1, kind="stable")  # candidates first, in time order
    ranks = np.minimum((picks * n_candidates).astype(np.int64), n_candidates - 1)
    chosen = np.take_along_axis(chronological, ranks, axis=1)
    if valid.shape[1] >= count:
        keys = np.where(candidates, subset_keys, np.inf)
        subset = np.argpartition(keys, count - 1, axis=1)[:, :count]
        chosen = np.where(n_candidates >= count, subset, chosen)
    return np.sort(chosen, axis=1)


def sampled_inputs(source: _SensorSource, pixels: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """float32 (P, k, C + 1): the source's standardised values at ``steps`` (P, k), raw DOY last."""
    series = source.standardised_series(pixels)  # (T, P, C)
    columns = np.broadcast_to(np.arange(len(pixels))[:, None], steps.shape)
    return np.concatenate([series[steps, columns], source.doys[steps][..., None]], axis=-1)


class SampledFamily(Family):
    """v1.0 and v1.0-QAT: 40 + 40 randomly drawn steps per pixel, optionally several draws averaged."""

    state_dict_keys = ("model_state", "model_state_dict")
    quantisation = V1_QUANTISATION
    demo_sizes = V1_DEMO_SIZES

    def normalisation(self, data_source: str) -> Normalisation:
        """v1.0 and v1.0-QAT have one table, whatever the data source."""
        return V1_0_NORMALISATION

    def default_arch(self) -> dict[str, Any]:
        raise NotImplementedError

    def pooling(self, d_model: int) -> nn.Module:
        raise NotImplementedError

    def build(self, *, latent_dim: int, nhead: int, num_layers: int, dim_feedforward: int) -> nn.Module:
        d_model = 4 * latent_dim

        def backbone(bands: int) -> TemporalBackbone:
            encoder = transformer_stack(d_model, nhead, num_layers, dim_feedforward)
            return TemporalBackbone(bands, d_model, encoder, self.pooling(d_model))

        dim_reducer = nn.Sequential(nn.Linear(2 * d_model, latent_dim))
        return V1Model(backbone(10), backbone(2), dim_reducer)

    def embedding_dim(self, arch: Mapping[str, Any]) -> int:
        return int(arch["latent_dim"])

    def arch_from_checkpoint(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """Published v1.0 checkpoints record no architecture; demo checkpoints keep theirs in ``config``."""
        config = checkpoint.get("config")
        if not isinstance(config, Mapping):
            return {}
        return {key: config[key] for key in self.default_arch() if key in config}

    def checkpoint_payload(self, state_dict, arch):
        return {"model_state_dict": state_dict, "config": dict(arch)}

    def empty_orbit_placeholders(self, asc_steps: int, desc_steps: int) -> tuple[bool, bool]:
        """Which orbits get one all-zero step at DOY 180 because they have no step at all.

        The v1.0 reference fails when both orbits are empty; then the QAT reference's placeholder
        (see v1_0_qat) is used, so that tiles without S1 still embed.
        """
        both_empty = asc_steps == 0 and desc_steps == 0
        return both_empty, both_empty

    def _with_placeholders(self, arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        orbits = ("sar_ascending", "sar_descending")
        placeholders = self.empty_orbit_placeholders(*(arrays[orbit].shape[0] for orbit in orbits))
        if not any(placeholders):
            return arrays
        arrays = dict(arrays)
        for orbit, placeholder in zip(orbits, placeholders):
            if placeholder:
                arrays[orbit] = np.zeros((1, *arrays[orbit].shape[1:]), np.int16)
                arrays[f"{orbit}_doy"] = np.array([180], np.int16)
        return arrays

    def prepare_batches(
        self, arrays: Mapping[str, np.ndarray], pixels: np.ndarray, *, data_source: str, seed: int,
        batch_pixels: int, repeat_times: int = 1,
    ) -> Iterator[Batch]:
        """Batches of (pixels, s2_x, s1_x); with ``repeat_times`` R > 1 the inputs are (P, R, 40, C)."""
        if repeat_times < 1:
            raise UserError(f"repeat_times = {repeat_times} must be at least 1: give the number of draws to average")
        if arrays["bands"].shape[0] == 0:
            raise UserError("the patch has no Sentinel-2 time step: the v1.0 families need Sentinel-2 input; "
                            "check the tile's S2 stack or use v1.1 / v2")
        arrays = self._with_placeholders(arrays)
        norm = self.normalisation(data_source)
        s2, s1 = _S2Source(arrays, norm), _S1Source(arrays, norm)
        pixels = np.asarray(pixels, np.int64)
        per_batch = max(1, batch_pixels // repeat_times)
        for start in range(0, len(pixels), per_batch):
            group = pixels[start:start + per_batch]
            s2_valid, s1_valid = s2.valid(group).T, s1.valid(group).T  # (P, T)
            observed = s2_valid.any(axis=1) | s1_valid.any(axis=1)
            if not observed.any():
                continue
            group, s2_valid, s1_valid = group[observed], s2_valid[observed], s1_valid[observed]
            # Four random streams per draw: S2 subset keys and picks, then S1's.
            s2_x = np.stack([self._draw(s2, s2_valid, group, seed, stream=4 * repeat)
                             for repeat in range(repeat_times)], axis=1)
            s1_x = np.stack([self._draw(s1, s1_valid, group, seed, stream=4 * repeat + 2)
                             for repeat in range(repeat_times)], axis=1)
            if repeat_times == 1:
                s2_x, s1_x = s2_x[:, 0], s1_x[:, 0]
            yield Batch(pixels=group, s2_x=torch.from_numpy(s2_x), s1_x=torch.from_numpy(s1_x))

    @staticmethod
    def _draw(source: _SensorSource, valid: np.ndarray, group: np.ndarray, seed: int, stream: int) -> np.ndarray:
        subset_keys = counter_uniforms(seed, stream, group, valid.shape[1])
        picks = counter_uniforms(seed, stream + 1, group, STEPS_PER_SENSOR)
        return sampled_inputs(source, group, draw_steps(valid, subset_keys, picks))


class V1_0(SampledFamily):
    name = "v1.0"
    description = "TESSERA v1.0 early fp32 (8 layers, GRU pooling, 40 + 40 random steps)"

    def default_arch(self) -> dict[str, Any]:
        return {"latent_dim": 128, "nhead": 8, "num_layers": 8, "dim_feedforward": 4096}

    def matches_keys(self, keys: set[str]) -> bool:
        return "s2_backbone.attn_pool.temporal_context.weight_ih_l0" in keys

    def pooling(self, d_model: int) -> nn.Module:
        return GRUAttentionPooling(d_model)


FAMILY = V1_0()
