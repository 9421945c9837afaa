"""TESSERA v2 pixel students (nano/small/medium/large), plain or with QK-norm attention.

Two backbones (S2: 10 bands, S1: VV, VH) of d_model = 4 · latent_dim with plain attention pooling,
concatenated into a dim_reducer that ends in a parameter-free LayerNorm: 128 Matryoshka-ordered
numbers per pixel. Hyper-parameters come from the checkpoint's ``args``; published layout
``{"model": state_dict, "args": {...}}``. Inputs use every valid observation, bucketed into bins
of 8..256 steps (UPSTREAM.md §6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.models.family import Normalisation
from tessera.models.layers import AttentionPooling, ConcatFusionModel, TemporalBackbone
from tessera.models.quantisation import V2_QUANTISATION
from tessera.models.sampling import BucketedFamily

BIN_WIDTH = 8
MAX_BIN = 256

STUDENT_NORMALISATION = Normalisation(
    s2_mean=(1633.0042, 1341.1090, 1539.5536, 3054.8269, 3117.4658, 2004.1648, 2694.7275, 2945.1504,
             2266.6079, 1657.3094),
    s2_std=(1999.4603, 2014.7549, 1929.2201, 1754.2493, 1649.9807, 1936.8988, 1748.6041, 1708.6991,
            1207.5250, 1108.6046),
    s1_asc_mean=(5909.3921, 3405.0322),
    s1_asc_std=(1507.1750, 1531.2615),
    s1_desc_mean=(5816.1382, 3277.7576),
    s1_desc_std=(1554.6475, 1546.4733),
)


class QKNormLayer(nn.Module):
    """Transformer layer whose per-head queries and keys are RMS-normalised before attention;
    subclasses place the LayerNorms (post-LN students, pre-LN teacher).

    The attribute names are the checkpoint key names of both references, so keep them.
    """

    # Whether Q and K are normalised in float32 under any autocast precision: the teacher does, for a
    # stable norm in bf16; the students normalise in the compute precision.
    qk_norm_in_fp32 = False

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.nhead = nhead
        head_dim = d_model // nhead
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.q_norm = nn.RMSNorm(head_dim)
        self.k_norm = nn.RMSNorm(head_dim)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, d_model = x.shape
        return x.view(batch, steps, self.nhead, d_model // self.nhead).transpose(1, 2)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of x (B, T, D) with QK-norm, output projection included."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.qk_norm_in_fp32:
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return self.out_proj(attended)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class QKNormEncoderLayer(QKNormLayer):
    """Post-LN QK-norm layer (v2 students), otherwise ``nn.TransformerEncoderLayer``'s arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.feed_forward(x))


class LayerStack(nn.ModuleList):
    """Layers applied in order; a bare list so the keys read ``transformer_encoder.<i>.*``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


def _encoder(d_model: int, nhead: int, num_layers: int, dim_feedforward: int, qk_norm: bool) -> nn.Module:
    if qk_norm:
        return LayerStack(QKNormEncoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers))
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


def pad_pattern(n_valid: int, length: int) -> np.ndarray:
    """Which of ``n_valid`` chronological observations fill ``length`` slots (reference ``_pad_pattern``).

    Enough observations: ``length`` evenly spaced ones (positions truncated). Too few: all of them,
    then the missing ``length − n`` as the middles of ``length − n`` near-equal consecutive chunks,
    or, when more are missing than present, cycling from the first.
    """
    if n_valid >= length:
        return np.linspace(0, n_valid - 1, length).astype(np.int64)
    extra = length - n_valid
    everything = np.arange(n_valid)
    if extra <= n_valid:
        fill = np.array([chunk[len(chunk) // 2] for chunk in np.array_split(everything, extra)])
    else:
        fill = np.arange(extra) % n_valid
    return np.concatenate([everything, fill]).astype(np.int64)


def valid_count_bins(counts: np.ndarray) -> np.ndarray:
    """Bin length per pixel of v2 students and teacher: valid counts rounded up to a multiple of 8,
    at most 256; 0 for none."""
    return np.where(counts <= 0, 0, np.minimum(-(-counts // BIN_WIDTH) * BIN_WIDTH, MAX_BIN))


class V2Student(BucketedFamily):
    name = "v2"
    matryoshka = True
    description = "TESSERA v2 pixel student (nano/small/medium/large, optional QK-norm)"
    quantisation = V2_QUANTISATION
    state_dict_keys = ("model",)
    bf16_on_cuda = False  # the reference runs the students in fp32 only (UPSTREAM.md §6.2)
    # "small" and "large" are published sizes. "tiny" is no published size: it exists to try or
    # benchmark the pipeline on a CPU (benchmarks/fulltile.py) without the inference dominating:
    # about 45x the small size's forward px/s and 60x its end-to-end px/s on 2 CPU threads (64-step
    # bin; `benchmarks/infer.py --families v2 --checkpoint v2=<a tiny demo checkpoint>` against the
    # small size), 80x its forward on one thread. It keeps repr_dim 128, so the
    # assembled tiles still have 128 bands; its embeddings are as meaningless as any demo checkpoint's.
    demo_sizes = {
        "small": {},
        "large": {"latent_dim": 160, "dim_feedforward": 2560},
        "tiny": {"latent_dim": 8, "num_layers": 1, "nhead": 2, "dim_feedforward": 32},
    }

    def default_arch(self) -> dict[str, Any]:
        return {"repr_dim": 128, "latent_dim": 64, "num_layers": 4, "nhead": 4, "dim_feedforward": 1024,
                "enable_qk_norm": False}

    def arch_from_checkpoint(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        args = checkpoint.get("args") or {}
        if not isinstance(args, Mapping):
            args = vars(args)
        return {key: args[key] for key in self.default_arch() if key in args}

    def matches_keys(self, keys: set[str]) -> bool:
        return ("s2_backbone.attn_pool.query.weight" in keys and "dim_reducer.4.weight" in keys
                and "fusion_modality_embed" not in keys  # the teacher's (same backbone and reducer names)
                and not any(".attn_pool.temporal_context." in key for key in keys))

    def build(self, *, repr_dim: int, latent_dim: int, num_layers: int, nhead: int, dim_feedforward: int,
              enable_qk_norm: bool) -> nn.Module:
        d_model = 4 * latent_dim

        def backbone(bands: int) -> TemporalBackbone:
            encoder = _encoder(d_model, nhead, num_layers, dim_feedforward, bool(enable_qk_norm))
            return TemporalBackbone(bands, d_model, encoder, AttentionPooling(d_model))

        dim_reducer = nn.Sequential(
            nn.Linear(2 * d_model, 4 * d_model), nn.LayerNorm(4 * d_model), nn.ReLU(), nn.Dropout(0.0),
            nn.Linear(4 * d_model, repr_dim), nn.LayerNorm(repr_dim, elementwise_affine=False),
        )
        return ConcatFusionModel(backbone(10), backbone(2), dim_reducer)

    def embedding_dim(self, arch: Mapping[str, Any]) -> int:
        return int(arch["repr_dim"])

    def checkpoint_payload(self, state_dict, arch):
        dims = [d for d in (16, 32, 64, 128) if d <= arch["repr_dim"]]
        args = {**arch, "max_seq_len": MAX_BIN, "matryoshka_dims": ",".join(map(str, dims))}
        return {"model": state_dict, "args": args}

    def bins(self, counts: np.ndarray) -> np.ndarray:
        return valid_count_bins(counts)

    def pattern(self, n_valid: int, length: int) -> np.ndarray:
        return pad_pattern(n_valid, length)

    def normalisation(self, data_kind: str) -> Normalisation:
        return STUDENT_NORMALISATION


FAMILY = V2Student()
