"""TESSERA v1.0 "early" fp32 model, and the 40 + 40 random time-step sampling of the v1.0 families.

Two backbones (S2: 10 bands, S1: VV, VH) of d_model = 4 · latent_dim: band embedding + sinusoidal
DOY encoding, a post-LN ``nn.TransformerEncoder`` (8 layers, 8 heads, FFN 4096 at full size), and
GRU-guided attention pooling; the two 512-d outputs are concatenated into ``dim_reducer``
= Linear(1024 → 128). Checkpoints keep the state dict under ``model_state`` or
``model_state_dict`` and carry the training projector, which is dropped (UPSTREAM.md §4.2–4.5).

Pixels: those with a non-zero S2 band at some step (the reference's rule, :func:`any_s2_value`).
Inputs: per pixel and sensor 40 time steps drawn uniformly from the valid ones (with replacement
only when fewer than 40 are valid; from all steps when none is), in chronological order, S1 as
the ascending block followed by the descending block. The reference draws with an unseeded global
generator; here every draw is a function of (seed, the pixel's tile-global row and column,
repeat, the candidate steps' dates), so reruns are identical, and a pixel's input depends neither
on which other pixels are embedded with it, nor on the patch layout or batch size, nor on dates
that are not valid at that pixel.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.errors import UserError
from tessera.models.family import Batch, Family, Normalisation
from tessera.models.inputs import S1Series, S2Series, SensorSeries
from tessera.models.layers import AttentionPooling, ConcatFusionModel, TemporalBackbone
from tessera.models.quantisation import V1_QUANTISATION
from tessera.models.sampling import counter_words, draw_steps, pixel_keys, stream_key

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

# Reduced size for demo checkpoints: v1.x was published at one size only, which is too slow on a
# CPU for trying the workflow; "full" is the published size.
V1_DEMO_SIZES = {"small": {"latent_dim": 64, "nhead": 4, "num_layers": 4, "dim_feedforward": 1024}, "full": {}}


def transformer_stack(d_model: int, nhead: int, num_layers: int, dim_feedforward: int) -> nn.TransformerEncoder:
    """The reference's post-LN ``nn.TransformerEncoder`` (ReLU, batch first, no final norm).

    Dropout is 0: the models are only ever evaluated.
    """
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class GRUAttentionPooling(AttentionPooling):
    """Softmax weights scored on a GRU's outputs, applied to the GRU's *inputs* (the tokens)."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.temporal_context = nn.GRU(d_model, d_model, batch_first=True)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        # The recurrence runs in float32 even under autocast (where CUDA would run it in bf16):
        # rounding errors would compound over the time steps.
        with torch.autocast(x.device.type, enabled=False):
            context, _ = self.temporal_context(x.float())
        return self.query(context)


def any_s2_value(bands: np.ndarray) -> np.ndarray:
    """(H·W,) bool: pixels with a non-zero S2 band at some time step, valid or not.

    The reference's pixel rule for v1.0 and v1.0-QAT (``SingleTileInferenceDataset``, with
    ``min_valid_timesteps`` 0): a pixel is embedded when any S2 band value is non-zero, whatever
    its masks and its S1; every other pixel is no-data (a pixel seen by S1 alone is skipped; a
    pixel whose S2 steps are all masked draws from all of them).
    """
    steps, height, width, channels = bands.shape
    seen = np.zeros(height * width, bool)
    for step in range(steps):  # one step at a time: a patch's whole series is gigabytes
        seen |= np.ascontiguousarray(bands[step]).reshape(height * width, channels).any(axis=1)
    return seen


class SampledFamily(Family):
    """v1.0 and v1.0-QAT: 40 + 40 randomly drawn steps per pixel, optionally several draws averaged."""

    state_dict_keys = ("model_state", "model_state_dict")
    quantisation = V1_QUANTISATION
    demo_sizes = V1_DEMO_SIZES
    bf16_on_cuda = False  # the reference runs v1.0 and v1.0-QAT in fp32 (UPSTREAM.md §4.6)

    def normalisation(self, data_kind: str) -> Normalisation:
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
        return ConcatFusionModel(backbone(10), backbone(2), dim_reducer)

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
        self, arrays: Mapping[str, np.ndarray], pixels: np.ndarray, *, data_kind: str, seed: int,
        batch_pixels: int, repeat_times: int = 1, origin: tuple[int, int] = (0, 0),
        device: torch.device | None = None,
    ) -> Iterator[Batch]:
        """Batches of ``repeat_times`` independent 40 + 40 draws per pixel (``Batch.repeats``).

        ``origin`` is the tile row and column of the arrays' first pixel: draws follow tile pixels.
        """
        if repeat_times < 1:
            raise UserError(f"repeat_times = {repeat_times} must be at least 1: give the number of draws to average")
        if arrays["bands"].shape[0] == 0:
            raise UserError("the patch has no Sentinel-2 time step: the v1.0 families need Sentinel-2 input; "
                            "check the tile's S2 stack or use v1.1 / v2")
        arrays = self._with_placeholders(arrays)
        norm = self.normalisation(data_kind)
        s2, s1 = S2Series(arrays, norm, device), S1Series(arrays, norm, device)
        pixels = np.asarray(pixels, np.int64)
        pixels = pixels[any_s2_value(arrays["bands"])[pixels]]
        keys = pixel_keys(pixels, arrays["bands"].shape[2], origin)
        per_batch = max(1, batch_pixels // repeat_times)
        for start in range(0, len(pixels), per_batch):
            group, group_keys = pixels[start:start + per_batch], keys[start:start + per_batch]
            # Four random streams per repeat: S2 subset and picks, then S1's.
            s2_bands, s2_doys = self._draws(s2, group, group_keys, seed, repeat_times, first_stream=0)
            s1_bands, s1_doys = self._draws(s1, group, group_keys, seed, repeat_times, first_stream=2)
            yield Batch(group, s2_bands, s2_doys, s1_bands, s1_doys, repeats=repeat_times)

    @staticmethod
    def _draws(source: SensorSeries, group: np.ndarray, group_keys: np.ndarray, seed: int, repeats: int,
               first_stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bands (G · R, 40, C) and DOYs (G · R, 40): R draws per pixel, a pixel's draws adjacent."""
        valid, counts = source.valid_rows(group), source.valid_counts[group]
        draws = []
        for repeat in range(repeats):
            stream = 4 * repeat + first_stream
            subset_words = counter_words(stream_key(seed, stream), group_keys, source.step_keys)
            pick_key = stream_key(seed, stream + 1)
            draws.append(draw_steps(valid, counts, subset_words,
                                    lambda rows: counter_words(pick_key, group_keys[rows], np.arange(STEPS_PER_SENSOR)),
                                    STEPS_PER_SENSOR))
        steps = draws[0] if repeats == 1 else np.stack(draws, axis=1).reshape(-1, STEPS_PER_SENSOR)
        return source.inputs(np.repeat(group, repeats), steps)


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
