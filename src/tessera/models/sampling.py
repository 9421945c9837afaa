"""Time-step sampling: which observations each pixel feeds the model.

Bucketed all-observation sampling (v1.1, v2): every valid step, resampled to a per-pixel bin
length. Counter-based random draws (v1.0 families): 40 steps drawn per pixel and sensor, a pure
function of (seed, tile pixel, dates), so reruns and any patch layout give the same draws.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from tessera.errors import UserError
from tessera.models.family import Batch, Family, Normalisation
from tessera.models.inputs import S1Series, S2Series, SensorSeries

# ``batch_pixels`` counts pixels of up to this many time steps; longer buckets get proportionally
# fewer pixels per batch, so that activation memory does not grow with the number of observations.
STEPS_PER_BATCH_PIXEL = 64


def pixels_per_batch(batch_pixels: int, steps: int) -> int:
    """Pixels per batch for sequences of ``steps`` time steps (at least one)."""
    return max(1, min(batch_pixels, batch_pixels * STEPS_PER_BATCH_PIXEL // steps))


class BucketedFamily(Family):
    """Families that feed every valid observation, resampled to a per-pixel bin length.

    Per pixel and sensor: the valid time steps (S2: mask ≠ 0; S1: VV or VH ≠ 0 on the raw codes,
    ascending then descending) in chronological order, standardised (S1 per orbit), resampled by
    ``pattern(n, length)`` to ``length = max(bin, 1)`` steps. A sensor without valid steps gets
    ``length`` all-zero rows (DOY 0 too); a pixel without valid steps in either sensor is no-data.
    Pixels are grouped by (s2 bin, s1 bin) and each group gathered with index arrays, in batches
    of at most :func:`pixels_per_batch` pixels. The selection is deterministic: ``seed`` and
    ``origin`` play no part, and ``repeat_times`` must be 1.
    """

    def bins(self, counts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pattern(self, n_valid: int, length: int) -> np.ndarray:
        """Indices into a pixel's ``n_valid`` chronological valid steps, ``length`` of them."""
        raise NotImplementedError

    def normalisation(self, data_kind: str) -> Normalisation:
        raise NotImplementedError

    def prepare_batches(self, arrays, pixels, *, data_kind, seed, batch_pixels, repeat_times=1, origin=(0, 0),
                        device=None):
        if repeat_times != 1:
            raise UserError(f"repeat_times = {repeat_times}, but family {self.name} selects time steps "
                            "deterministically, so every draw would be the same: set repeat_times to 1")
        norm = self.normalisation(data_kind)
        s2, s1 = S2Series(arrays, norm, device), S1Series(arrays, norm, device)
        pixels = np.asarray(pixels, np.int64)
        n_s2, n_s1 = s2.valid_counts[pixels], s1.valid_counts[pixels]
        has_data = (n_s2 > 0) | (n_s1 > 0)
        pixels, n_s2, n_s1 = pixels[has_data], n_s2[has_data], n_s1[has_data]
        bin_s2, bin_s1 = self.bins(n_s2), self.bins(n_s1)
        order = np.lexsort((bin_s1, bin_s2))  # stable: pixels stay in row-major order within a bucket
        keys = np.stack([bin_s2[order], bin_s1[order]], axis=1)
        starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)]) if len(order) else np.array([], int)
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends):
            length_s2, length_s1 = max(int(keys[start, 0]), 1), max(int(keys[start, 1]), 1)
            step = pixels_per_batch(batch_pixels, max(length_s2, length_s1))
            for chunk in range(start, end, step):
                members = order[chunk:min(chunk + step, end)]
                group = pixels[members]
                s2_bands, s2_doys = self.resampled(s2, group, n_s2[members], length_s2)
                s1_bands, s1_doys = self.resampled(s1, group, n_s1[members], length_s1)
                yield Batch(group, s2_bands, s2_doys, s1_bands, s1_doys)

    def resampled(self, source: SensorSeries, group: np.ndarray, counts: np.ndarray,
                  length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bands (G, length, C) and DOYs (G, length) of ``group``, whose valid-step ``counts`` are given."""
        if not counts.any():
            return (torch.zeros(len(group), length, source.channels, device=source.device),
                    torch.zeros(len(group), length, device=source.device))
        table = _pattern_table(self.pattern, int(counts.max()), length)  # (n_max + 1, length)
        steps = nth_set_steps(source.valid_rows(group), counts, np.take(table, counts, axis=0))
        bands, doys = source.inputs(group, steps)
        if not counts.all():
            empty = torch.from_numpy(counts == 0).to(bands.device)
            bands[empty] = 0.0
            doys[empty] = 0.0
        return bands, doys


def nth_set_steps(mask: np.ndarray, counts: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """(G, L) time indices: in row g of ``mask`` (G, T), the ``ranks[g]``-th set steps in time order.

    ``counts`` are the rows' numbers of set steps (ranks below them); a row without any gets step 0.
    """
    rows, steps = mask.shape
    set_flat = np.flatnonzero(mask)  # row · T + t of every set entry, row by row
    if not len(set_flat):
        return np.zeros((rows, ranks.shape[1]), np.int64)
    positions = ranks + (np.cumsum(counts) - counts)[:, None]
    # "clip": a row without set steps may point one past the end; its result is overwritten.
    picked = np.take(set_flat, positions, mode="clip")
    picked -= np.arange(0, rows * steps, steps)[:, None]
    if not counts.all():
        picked[counts == 0] = 0
    return picked


def _pattern_table(pattern: Callable[[int, int], np.ndarray], n_max: int, length: int) -> np.ndarray:
    """Row n = ``pattern(n, length)``; row 0 (no valid step) points at step 0 and is zeroed later."""
    return np.stack([np.zeros(length, np.int64)]
                    + [_cached_pattern(pattern, n, length) for n in range(1, n_max + 1)])


@functools.lru_cache(maxsize=8192)
def _cached_pattern(pattern: Callable[[int, int], np.ndarray], n_valid: int, length: int) -> np.ndarray:
    indices = np.asarray(pattern(n_valid, length), np.int64)
    indices.setflags(write=False)
    return indices


# ---------------------------------------------------------------------------------------------
# Counter-based random words: a pure function of (key, pixel, counter), computed for whole arrays
# at once. A sequential generator would tie a pixel's draws to its position in the run. The words
# are 32-bit, which halves the cost of hashing and selecting; each pixel's 64-bit key enters them.

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_GOLDEN_GAMMA_32 = np.uint32(0x9E3779B9)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_MIX32_1 = np.uint32(0x85EBCA6B)
_MIX32_2 = np.uint32(0xC2B2AE35)
_U64 = (1 << 64) - 1
_NOT_A_CANDIDATE = np.uint32(0xFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose outputs look independent."""
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


def _mix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, in place: a bijection of uint32."""
    x ^= x >> np.uint32(16)
    x *= _MIX32_1
    x ^= x >> np.uint32(13)
    x *= _MIX32_2
    x ^= x >> np.uint32(16)
    return x


def stream_key(seed: int, stream: int) -> np.uint64:
    """The key of one random stream of a run (``stream`` numbers the sensor, purpose and repeat)."""
    with np.errstate(over="ignore"):
        return _mix64(np.uint64(seed & _U64) * _GOLDEN_GAMMA + _mix64(np.uint64(stream & _U64)))


def counter_words(key: np.uint64, pixel_keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """uint32 (P, K): one word per (pixel, counter), fixed by (key, pixel key, counter).

    For one pixel, distinct counters (below 2³²) give distinct words: the counter enters through
    ``low + counter · γ`` (γ odd), then a XOR and ``_mix32``, all bijections of uint32.
    """
    with np.errstate(over="ignore"):
        per_pixel = _mix64(_mix64(pixel_keys.astype(np.uint64) ^ key))
        low = per_pixel.astype(np.uint32)  # the low 32 bits
        high = (per_pixel >> np.uint64(32)).astype(np.uint32)
        words = low[:, None] + counters.astype(np.uint32) * _GOLDEN_GAMMA_32
        words ^= high[:, None]
        return _mix32(words)


def pixel_keys(pixels: np.ndarray, width: int, origin: tuple[int, int]) -> np.ndarray:
    """uint64 ``row << 32 | col`` of flat patch pixels, in tile coordinates (patch at ``origin``)."""
    rows, cols = np.divmod(np.asarray(pixels, np.int64), width)
    return ((rows + origin[0]).astype(np.uint64) << np.uint64(32)) | (cols + origin[1]).astype(np.uint64)


def draw_steps(valid: np.ndarray, counts: np.ndarray, subset_words: np.ndarray,
               pick_words: Callable[[np.ndarray], np.ndarray], count: int) -> np.ndarray:
    """(P, count) chronological time indices per pixel, drawn as the reference does.

    ``valid`` (P, T), with ``counts`` valid steps per row: candidates are a pixel's valid steps, or
    all steps when it has none. With at
    least ``count`` candidates, the ``count`` with the smallest ``subset_words`` (P, T; distinct
    within a row) — a uniform subset, i.e. without replacement — which a mask keeps in time order.
    With fewer, ranks ``word · n / 2³²`` into the candidates (uniform, with replacement), put in
    order by counting; ``pick_words(rows)`` gives the (len(rows), count) words of those pixels
    (indices into ``valid``), so that only they pay for them.
    """
    candidates = valid
    if not counts.all():
        candidates = valid.copy()
        candidates[counts == 0] = True
        counts = np.where(counts == 0, valid.shape[1], counts)
    steps = np.empty((len(valid), count), np.int64)
    many = np.flatnonzero(counts >= count)
    if len(many):
        everything = len(many) == len(valid)  # the usual case: no row copies
        words = np.minimum(subset_words if everything else subset_words[many], _NOT_A_CANDIDATE - np.uint32(1))
        words |= (~(candidates if everything else candidates[many])).astype(np.uint32) * _NOT_A_CANDIDATE
        kth = np.partition(words, count - 1, axis=1)[:, count - 1:count]
        # Exactly ``count`` words per row are at most the row's count-th smallest: their positions.
        drawn = np.flatnonzero(words <= kth).reshape(-1, count) - np.arange(len(many))[:, None] * valid.shape[1]
        if everything:
            return drawn
        steps[many] = drawn
    few = np.flatnonzero(counts < count)
    n_few = counts[few]
    ranks = (pick_words(few).astype(np.uint64) * n_few[:, None].astype(np.uint64)) >> np.uint64(32)
    # Sorting by counting: how often each rank was drawn, then each rank repeated that often.
    histogram = np.bincount((np.arange(len(few))[:, None] * count + ranks.astype(np.int64)).ravel(),
                            minlength=len(few) * count)
    sorted_ranks = np.repeat(np.tile(np.arange(count), len(few)), histogram).reshape(len(few), count)
    steps[few] = nth_set_steps(candidates[few], n_few, sorted_ranks)
    return steps
