"""Gathering model inputs from a patch's arrays: each sensor's series, standardised per step.

A family's time-step sampling (``tessera.models.sampling``, the v1.0 draws) chooses which steps
each pixel gets; a :class:`SensorSeries` turns those choices into standardised model inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from tessera.models.family import Normalisation


@dataclass(frozen=True)
class SeriesPart:
    """One stretch of a sensor's time axis with its own z-score table (S1: one per orbit)."""

    values: np.ndarray  # (T, H, W, C) raw codes
    doys: np.ndarray  # (T,)
    valid: np.ndarray  # (T, H, W) bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


class SensorSeries:
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


class S2Series(SensorSeries):
    """S2 bands, valid where the mask is non-zero."""

    def __init__(self, arrays: Mapping[str, np.ndarray], norm: Normalisation, device: torch.device | None = None):
        super().__init__([SeriesPart(arrays["bands"], arrays["doys"], np.asarray(arrays["masks"]) != 0,
                                     norm.s2_mean, norm.s2_std)], device)


class S1Series(SensorSeries):
    """S1 ascending then descending [VV, VH] codes, valid where either is non-zero, z-scored per orbit."""

    def __init__(self, arrays: Mapping[str, np.ndarray], norm: Normalisation, device: torch.device | None = None):
        orbits = (("sar_ascending", norm.s1_asc_mean, norm.s1_asc_std),
                  ("sar_descending", norm.s1_desc_mean, norm.s1_desc_std))
        super().__init__([
            SeriesPart(arrays[name], arrays[f"{name}_doy"], _either_channel_set(arrays[name]), mean, std)
            for name, mean, std in orbits
        ], device)
