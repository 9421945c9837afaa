"""Torch building blocks that several families share. Their attribute names are the checkpoint key
names (``embedding.0``, ``transformer_encoder``, ``attn_pool``, ``dim_reducer`` ...): keep them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
