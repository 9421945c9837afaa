"""The reference's encodings of Sentinel-2 and Sentinel-1 values (UPSTREAM.md §0–1), exactly."""


from __future__ import annotations

import numpy as np
import pystac

from tessera.sources import Source

INVALID_SCL = (0, 1, 2, 3, 8, 9)  # no data, saturated/defective, dark area, cloud shadow, cloud medium/high
S1_CODE_MAX = 32767


def encode_s2(values: np.ndarray, item: pystac.Item, source: Source, valid: np.ndarray) -> np.ndarray:
    """Reflectance DN of ``item`` -> the reference's uint16: harmonise, no data -> 0, truncate.

    ``values`` are in the asset's data type; no data is where ``valid`` is False (and NaN). The
    reference computes in float64; for uint16 DN (what L2A COGs hold) the same integers come out of
    integer arithmetic, at a fraction of the cost, so only other types are converted.
    """
    if values.dtype != np.uint16:
        values = values.astype(np.float64)
        values[~valid] = np.nan
        return np.nan_to_num(source.harmonise_s2(values, item), nan=0.0).astype(np.uint16)
    return np.where(valid, source.harmonise_s2(values, item), np.uint16(0))


def encode_s1(gamma0: np.ndarray) -> np.ndarray:
    """Linear γ0 -> int16 code trunc(clip((20·log10 γ0 + 50)·200, 0, 32767)); non-finite or <= 0 -> 0.

    20·log10 of a power quantity is twice its dB value: the reference's encoding, kept because the
    checkpoints' normalisation was computed on it.
    """
    usable = np.isfinite(gamma0) & (gamma0 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        code = (20.0 * np.log10(np.where(usable, gamma0, 1.0)) + 50.0) * 200.0
    return np.where(usable, np.clip(code, 0, S1_CODE_MAX), 0).astype(np.int16)


def has_s1_code(sar: np.ndarray) -> np.ndarray:
    """True where VV or VH of (..., 2) S1 codes is present (non-zero); the channels are compared one by
    one, which numpy does several times faster than ``any`` over an axis of length 2."""
    vv, vh = sar[..., 0], sar[..., 1]
    return (vv != 0) | (vh != 0)


def valid_scl(scl: np.ndarray) -> np.ndarray:
    """True where an SCL class is usable (4 vegetation, 5 bare, 6 water, 7 unclassified, 10 thin cirrus, 11 snow).

    Any class but the reference's invalid ones is usable, as in the reference; NaN (a float SCL's
    no data) is not, as the reference's fill value 0 is not."""
    usable = ~np.isin(scl, INVALID_SCL)
    if np.issubdtype(scl.dtype, np.floating):
        usable &= ~np.isnan(scl)
    return usable

