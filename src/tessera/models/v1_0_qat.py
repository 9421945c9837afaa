"""TESSERA v1.0 QAT: the model behind the GeoTessera v1 int8 product (UPSTREAM.md §4.8).

Same inputs as v1.0 (40 + 40 random steps, v1.0 normalisation) and the same shape of encoder, but
4 layers and 4 heads per backbone and a different pooling: a hand-written GRU over the
transformer outputs, LayerNorm on its outputs, a linear score, softmax over time, and the
weighted sum of the transformer outputs. The hand-written cell is *not* ``nn.GRU``: the reset
gate multiplies the hidden state before its projection, and ``z`` weighs the candidate state.
v1.1 reuses this pooling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessera.models.layers import AttentionPooling
from tessera.models.v1_0 import SampledFamily


class HandWrittenGRUCell(nn.Module):
    """The parameters of one step of the reference's GRU cell (bias-free projections, separate
    gate biases), which :class:`HandWrittenGRU` applies:

    r = σ(W_ir x + W_hr h + b_r),  z = σ(W_iz x + W_hz h + b_z),
    ĥ = tanh(W_ih x + W_hh (r ⊙ h) + b_h),  h' = (1 − z) ⊙ h + z ⊙ ĥ.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.W_ir = nn.Linear(d_model, d_model, bias=False)
        self.W_iz = nn.Linear(d_model, d_model, bias=False)
        self.W_ih = nn.Linear(d_model, d_model, bias=False)
        self.W_hr = nn.Linear(d_model, d_model, bias=False)
        self.W_hz = nn.Linear(d_model, d_model, bias=False)
        self.W_hh = nn.Linear(d_model, d_model, bias=False)
        self.b_r = nn.Parameter(torch.zeros(d_model))
        self.b_z = nn.Parameter(torch.zeros(d_model))
        self.b_h = nn.Parameter(torch.zeros(d_model))


class HandWrittenGRU(nn.Module):
    """The cell run over (B, T, D) from h0 = 0; returns every step's hidden state (B, T, D).

    Same arithmetic as stepping :class:`HandWrittenGRUCell`, arranged for speed: the input
    projections of all steps are one matmul before the loop, and the two hidden projections that
    need only ``h`` are one matmul per step.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.gru_cell = HandWrittenGRUCell(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cell = self.gru_cell
        d_model = x.shape[2]
        input_weight = torch.cat([cell.W_ir.weight, cell.W_iz.weight, cell.W_ih.weight])
        input_bias = torch.cat([cell.b_r, cell.b_z, cell.b_h])
        # The recurrence stays in float32 under autocast: only the matmuls run at low precision.
        projected = F.linear(x, input_weight, input_bias).float()  # (B, T, 3D): r, z and candidate parts
        gate_weight = torch.cat([cell.W_hr.weight, cell.W_hz.weight])
        h = projected.new_zeros(x.shape[0], d_model)
        states = []
        for step in range(x.shape[1]):
            gates = torch.sigmoid(projected[:, step, :2 * d_model] + F.linear(h, gate_weight))
            r, z = gates[:, :d_model], gates[:, d_model:]
            candidate = torch.tanh(projected[:, step, 2 * d_model:] + cell.W_hh(r * h))
            h = (1 - z) * h + z * candidate
            states.append(h)
        return torch.stack(states, dim=1)


class NormalisedGRUAttentionPooling(AttentionPooling):
    """Weights from LayerNorm(GRU outputs) → linear score → softmax, applied to the tokens."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.temporal_context = HandWrittenGRU(d_model)
        self.layer_norm = nn.LayerNorm(d_model)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(self.layer_norm(self.temporal_context(x)))


class V1_0_QAT(SampledFamily):
    name = "v1.0-qat"
    description = "TESSERA v1.0 QAT (GeoTessera v1 int8 product; 4 layers, hand-written GRU pooling)"

    def default_arch(self) -> dict[str, Any]:
        return {"latent_dim": 128, "nhead": 4, "num_layers": 4, "dim_feedforward": 4096}

    def matches_keys(self, keys: set[str]) -> bool:
        # v1.1 has the same backbones but an MLP dim_reducer (dim_reducer.1 is its LayerNorm).
        return ("s2_backbone.attn_pool.temporal_context.gru_cell.W_ir.weight" in keys
                and "dim_reducer.1.weight" not in keys)

    def pooling(self, d_model: int) -> nn.Module:
        return NormalisedGRUAttentionPooling(d_model)

    def empty_orbit_placeholders(self, asc_steps: int, desc_steps: int) -> tuple[bool, bool]:
        """The QAT reference gives every orbit without any step one all-zero step at DOY 180."""
        return asc_steps == 0, desc_steps == 0


FAMILY = V1_0_QAT()
