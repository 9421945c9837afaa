"""The families' int8 storage (no torch): what ``tessera.assemble`` needs of a family, importable
without its model code (``tessera.models.REGISTRY`` names each family's)."""

from __future__ import annotations

from dataclasses import dataclass


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


# v1.x per-pixel int8: codes in [-128, 127], the scale itself floored at 1e-8 (UPSTREAM.md §4.8).
V1_QUANTISATION = Quantisation(code_min=-128, code_max=127, scale_floor=1e-8, floor_on_absmax=False)
# v2 students and teacher: codes in [-127, 127], max|e| floored at 1e-12 before dividing.
V2_QUANTISATION = Quantisation(code_min=-127, code_max=127, scale_floor=1e-12, floor_on_absmax=True)
