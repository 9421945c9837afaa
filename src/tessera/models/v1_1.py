"""TESSERA v1.1 (MPC and AWS checkpoints), UPSTREAM.md §5.

Backbones as v1.0 QAT (hand-written GRU + LayerNorm pooling) at d_model 768, 4 layers, 4 heads,
FFN 2048; ``dim_reducer`` = Linear(1536 → 3072) → LayerNorm → ReLU → Dropout → Linear(3072 → 192).
The model returns the full ``representation_dim`` vector; the stored embedding is its first
``save_embedding_dim`` (128) numbers. The architecture comes from the checkpoint's ``config``.

Inputs: every valid observation, resampled to the smallest of 8, 16, …, 256 steps that holds
them (``build_resample_indices``); S1 ascending rows standardised with the ascending table, then
descending rows with the descending table; one normalisation table per data source (MPC or AWS),
which must be the one the checkpoint was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.errors import UserError
from tessera.models.family import Normalisation
from tessera.models.layers import ConcatFusionModel, TemporalBackbone
from tessera.models.sampling import BucketedFamily
from tessera.models.v1_0 import V1_QUANTISATION, transformer_stack
from tessera.models.v1_0_qat import NormalisedGRUAttentionPooling

# The bins (``num_obs_checkpoints``) of every published v1.1 checkpoint.
OBSERVATION_BINS = tuple(range(8, 257, 8))

MPC_NORMALISATION = Normalisation(
    s2_mean=(2683.4553, 2223.3630, 2432.0950, 3633.1970, 3602.1755, 3006.4324, 3400.2710, 3515.6392,
             2456.9163, 1983.8783),
    s2_std=(2739.5217, 2846.2993, 2690.8250, 2290.0439, 2088.8970, 2673.1106, 2381.4521, 2229.5225,
            1601.0942, 1495.3545),
    s1_asc_mean=(5588.3291, 3025.6270),
    s1_asc_std=(1713.4646, 1693.0471),
    s1_desc_mean=(5552.9683, 2955.0520),
    s1_desc_std=(1685.5857, 1677.6414),
)

# The AWS table as refreshed on 2026-05-03 (the retrained AWS checkpoint).
AWS_NORMALISATION = Normalisation(
    s2_mean=(2793.6589, 2356.7776, 2551.0496, 3741.9229, 3713.7844, 3120.1997, 3516.3342, 3637.0342,
             2501.0283, 2038.1504),
    s2_std=(2810.0093, 2933.8835, 2755.6360, 2344.5027, 2145.7986, 2743.9019, 2438.8601, 2286.5977,
            1680.7367, 1585.5529),
    s1_asc_mean=(5697.0859, 2838.6687),
    s1_asc_std=(1671.3737, 1789.4116),
    s1_desc_mean=(5759.1367, 2873.2854),
    s1_desc_std=(1583.2858, 1747.8390),
)

# By kind of data (``Source.data_kind``): S2 harmonised by the MPC rule, or as stored (Earth Search, OPERA).
NORMALISATION_BY_KIND = {"mpc": MPC_NORMALISATION, "aws": AWS_NORMALISATION}


def build_resample_indices(n_valid: int, length: int) -> np.ndarray:
    """Which of ``n_valid`` chronological observations fill ``length`` slots (reference semantics).

    Equal: all. Too many: the middle element (``len // 2``) of each of ``length`` near-equal
    consecutive chunks (the first ``n % length`` chunks one longer). Too few: all of them, then
    the ``length − n`` interior points of ``rint(linspace(0, n − 1, length − n + 2))``.
    Example: n = 5, length = 8 → 0 1 2 3 4 1 2 3.
    """
    if length == n_valid:
        return np.arange(n_valid)
    if length < n_valid:
        chunk, longer = divmod(n_valid, length)
        index = np.arange(length)
        starts = index * chunk + np.minimum(index, longer)
        sizes = chunk + (index < longer)
        return starts + sizes // 2
    anchors = np.rint(np.linspace(0, n_valid - 1, length - n_valid + 2))[1:-1].astype(np.int64)
    return np.concatenate([np.arange(n_valid), anchors])


def _training_config(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint's training ``config``: a dict, or a Namespace as some training scripts save it."""
    config = checkpoint.get("config") or {}
    return config if isinstance(config, Mapping) else vars(config)


class V1_1(BucketedFamily):
    name = "v1.1"
    description = "TESSERA v1.1 (MPC or AWS checkpoint; all observations, bucketed; 128 of 192 dims stored)"
    quantisation = V1_QUANTISATION
    state_dict_keys = ("model_state", "model_state_dict")
    bf16_on_cuda = True  # the reference's v1.1 config: CUDA autocast bf16 (UPSTREAM.md §5.1)
    # Reduced "small" for trying the workflow on a CPU (see v1_0.V1_DEMO_SIZES); "full" is published.
    demo_sizes = {
        "small": {"latent_dim": 64, "s2_dim_feedforward": 1024, "s1_dim_feedforward": 1024},
        "full": {},
    }

    def default_arch(self) -> dict[str, Any]:
        return {
            "latent_dim": 192, "representation_dim": 192, "save_embedding_dim": 128,
            "s2_num_heads": 4, "s2_num_layers": 4, "s2_dim_feedforward": 2048,
            "s1_num_heads": 4, "s1_num_layers": 4, "s1_dim_feedforward": 2048,
        }

    def arch_from_checkpoint(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        config = _training_config(checkpoint)
        if config.get("split_s1_modalities"):
            raise UserError("checkpoint config sets split_s1_modalities: only v1.1 checkpoints with one S1 backbone "
                            "(split_s1_modalities False, as published) are supported; use a published checkpoint")
        if config.get("fusion_method", "concat") != "concat":
            raise UserError(f"checkpoint config sets fusion_method {config['fusion_method']!r}: only 'concat' (as "
                            "published) is supported; use a published v1.1 checkpoint")
        bins = config.get("num_obs_checkpoints")
        if bins is not None and tuple(bins) != OBSERVATION_BINS:
            raise UserError(f"checkpoint config sets num_obs_checkpoints {list(bins)}: only the published bins "
                            "8, 16, ..., 256 are supported; use a published v1.1 checkpoint")
        return {key: config[key] for key in self.default_arch() if key in config}

    def trained_on(self, checkpoint: Mapping[str, Any], path: str) -> str | None:
        """The training config's ``data_source``, else the published file name's
        (``tessera_v1_1_{mpc,aws}_encoder.pt``)."""
        config = _training_config(checkpoint)
        if config.get("data_source") in NORMALISATION_BY_KIND:
            return config["data_source"]
        named = [source for source in NORMALISATION_BY_KIND if f"_{source}_" in os.path.basename(path).lower()]
        return named[0] if len(named) == 1 else None

    def matches_keys(self, keys: set[str]) -> bool:
        return ("s2_backbone.attn_pool.temporal_context.gru_cell.W_ir.weight" in keys
                and "dim_reducer.4.weight" in keys)

    def build(self, *, latent_dim: int, representation_dim: int, save_embedding_dim: int,
              s2_num_heads: int, s2_num_layers: int, s2_dim_feedforward: int,
              s1_num_heads: int, s1_num_layers: int, s1_dim_feedforward: int) -> nn.Module:
        if not 0 < save_embedding_dim <= representation_dim:
            raise UserError(f"save_embedding_dim {save_embedding_dim} must be between 1 and representation_dim "
                            f"{representation_dim}: fix the v1.1 architecture options")
        d_model = 4 * latent_dim

        def backbone(bands: int, nhead: int, num_layers: int, dim_feedforward: int) -> TemporalBackbone:
            encoder = transformer_stack(d_model, nhead, num_layers, dim_feedforward)
            return TemporalBackbone(bands, d_model, encoder, NormalisedGRUAttentionPooling(d_model))

        dim_reducer = nn.Sequential(
            nn.Linear(2 * d_model, 4 * d_model), nn.LayerNorm(4 * d_model), nn.ReLU(), nn.Dropout(0.0),
            nn.Linear(4 * d_model, representation_dim),
        )
        return ConcatFusionModel(backbone(10, s2_num_heads, s2_num_layers, s2_dim_feedforward),
                                 backbone(2, s1_num_heads, s1_num_layers, s1_dim_feedforward), dim_reducer)

    def embedding_dim(self, arch: Mapping[str, Any]) -> int:
        return int(arch["save_embedding_dim"])

    def stored_embedding(self, output: torch.Tensor, arch: Mapping[str, Any]) -> torch.Tensor:
        return output[..., : int(arch["save_embedding_dim"])]

    def checkpoint_payload(self, state_dict, arch):
        config = {**arch, "fusion_method": "concat", "split_s1_modalities": False,
                  "num_obs_checkpoints": list(OBSERVATION_BINS)}
        return {"model_state_dict": state_dict, "config": config}

    def bins(self, counts: np.ndarray) -> np.ndarray:
        """Smallest bin holding ``counts`` observations; 0 → 8 (zero rows), above 256 → 256."""
        table = np.asarray(OBSERVATION_BINS)
        return table[np.minimum(np.searchsorted(table, counts, side="left"), len(table) - 1)]

    def pattern(self, n_valid: int, length: int) -> np.ndarray:
        return build_resample_indices(n_valid, length)

    def normalisation(self, data_kind: str) -> Normalisation:
        try:
            return NORMALISATION_BY_KIND[data_kind]
        except KeyError:
            raise UserError(f"data kind {data_kind!r} has no v1.1 normalisation table: use mpc or aws, the kind "
                            "the checkpoint was trained on") from None


FAMILY = V1_1()
