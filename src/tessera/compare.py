"""`tessera compare A B`: two output directories in geotessera's layout, tile by tile.

For example our output against published tiles downloaded with geotessera, to check that a setup
reproduces the published embeddings of a tile-year before computing tiles that are not published.
Tiles are matched by year and name (``tessera.layout.find_tiles``); on the pixels both embed
(int8 codes dequantised with their per-pixel scales; a scale that is 0 or not finite is no-data)
the per-pixel cosine similarity is summarised per tile (median, 1st percentile, minimum), with the
share of pixels whose two embeddings are equal within int8 storage error: every dimension differs
by at most half a quantisation step of each, ``(scale_a + scale_b) / 2``, which is what two
quantisations of one float embedding can differ by. A histogram of the cosines of every compared
pixel is written as a PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tessera.errors import UserError
from tessera.io import atomic_path
from tessera.layout import EMBEDDINGS_DIR, Results, TileFiles, find_tiles

ROWS_PER_BLOCK = 64  # rows of a tile dequantised at once: a full tile in float64 would be 1.2 GB per side
HISTOGRAM_BINS = 100
# Relative slack on the storage-error bound: code · scale is exact in float64, the rest rounds once.
_ROUNDING = 1e-9


@dataclass(frozen=True)
class TileComparison:
    """One tile-year compared: pixels embedded in both, only in A, only in B, and the cosine summary."""

    tile: str
    year: int
    pixels: int
    only_a: int
    only_b: int
    median: float
    p1: float
    minimum: float
    within_storage_error: float  # share of the common pixels

    def line(self) -> str:
        return (f"{self.year} {self.tile:<17} {self.pixels:>9,} {self.only_a:>8,} {self.only_b:>8,} "
                f"{self.median:>9.6f} {self.p1:>9.6f} {self.minimum:>9.6f} {100 * self.within_storage_error:>8.2f} %")


HEADER = (f"{'year':<4} {'tile':<17} {'pixels':>9} {'only A':>8} {'only B':>8} {'median':>9} {'1st pct':>9} "
          f"{'minimum':>9} {'in int8 error':>10}")


def _open(files: TileFiles) -> tuple[np.ndarray, np.ndarray]:
    try:
        codes = np.load(files.embedding, mmap_mode="r")
        scales = np.load(files.scales, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{files.embedding} or its scales cannot be read ({error}): download or rebuild the tile") from None
    if codes.ndim != 3 or scales.shape != codes.shape[:2]:
        raise UserError(f"{files.embedding} is {codes.shape} with scales {scales.shape}: not a geotessera tile "
                        "(int8 (H, W, D) and scales (H, W)); download or rebuild the tile")
    return codes, scales


def compare_tile(a: TileFiles, b: TileFiles) -> tuple[TileComparison, np.ndarray]:
    """The comparison of one tile-year, and the cosine of every common pixel (float32)."""
    codes_a, scales_a = _open(a)
    codes_b, scales_b = _open(b)
    if codes_a.shape != codes_b.shape:
        raise UserError(f"{a.tile.name} {a.year}: {a.embedding} is {codes_a.shape} but {b.embedding} is "
                        f"{codes_b.shape}: compare embeddings of the same grid and length (export.dims)")
    cosines, within, only_a, only_b = [], 0, 0, 0
    for start in range(0, codes_a.shape[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        sa, sb = np.asarray(scales_a[rows], np.float64), np.asarray(scales_b[rows], np.float64)
        valid_a, valid_b = np.isfinite(sa) & (sa > 0), np.isfinite(sb) & (sb > 0)
        only_a += int((valid_a & ~valid_b).sum())
        only_b += int((valid_b & ~valid_a).sum())
        both = valid_a & valid_b
        ea = np.asarray(codes_a[rows], np.float64)[both] * sa[both][:, None]
        eb = np.asarray(codes_b[rows], np.float64)[both] * sb[both][:, None]
        norms = np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1)
        cosines.append(np.einsum("pd,pd->p", ea, eb) / np.where(norms > 0, norms, 1.0))
        bound = (sa[both] + sb[both]) / 2 * (1 + _ROUNDING)
        within += int((np.abs(ea - eb).max(axis=1, initial=0.0) <= bound).sum())
    cosine = np.concatenate(cosines).astype(np.float32) if cosines else np.zeros(0, np.float32)
    if cosine.size == 0:
        stats = (float("nan"),) * 3
    else:
        stats = (float(np.median(cosine)), float(np.percentile(cosine, 1)), float(cosine.min()))
    return TileComparison(a.tile.name, a.year, int(cosine.size), only_a, only_b, *stats,
                          within / cosine.size if cosine.size else float("nan")), cosine


def common_tiles(dir_a: Path, dir_b: Path, year: int | None = None) -> list[tuple[TileFiles, TileFiles]]:
    """Tile-years with an embedding and scales in both directories (optionally of one year)."""
    def usable(directory: Path) -> dict[tuple[int, str], TileFiles]:
        if not Path(directory).is_dir():
            raise UserError(f"{directory} is not a directory: give two output directories in geotessera's layout")
        return {(f.year, f.tile.name): f for f in find_tiles(Results(directory))
                if f.embedding.exists() and f.scales.exists() and (year is None or f.year == year)}

    in_a, in_b = usable(dir_a), usable(dir_b)
    shared = sorted(in_a.keys() & in_b.keys())
    if not shared:
        which = "" if year is None else f" of {year}"
        raise UserError(f"{dir_a} ({len(in_a)} tiles{which}) and {dir_b} ({len(in_b)} tiles{which}) have no tile-year "
                        f"in common: give directories with the same tiles (geotessera layout: {EMBEDDINGS_DIR}/"
                        "<year>/<tile>/<tile>.npy and _scales.npy)")
    return [(in_a[key], in_b[key]) for key in shared]


def write_histogram(counts: np.ndarray, out_png: Path, *, width: int = 4 * HISTOGRAM_BINS, height: int = 200) -> Path:
    """A bar chart of ``counts`` (one bar per bin, bar heights on a square-root scale so that the
    tails show) as a greyscale PNG."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    image = np.full((height, width), 255, np.uint8)
    heights = np.sqrt(counts / max(int(counts.max()), 1)) * (height - 1)
    bar = width // len(counts)
    for index, value in enumerate(heights):
        top = height - int(round(value))
        image[top:, index * bar:(index + 1) * bar - 1] = 40
    image[-1, :] = 0  # the axis
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a picture, not a map
        with MemoryFile() as memory:
            with memory.open(driver="PNG", width=width, height=height, count=1, dtype="uint8") as dst:
                dst.write(image, 1)
            png = memory.read()
    with atomic_path(out_png) as tmp:
        tmp.write_bytes(png)
    return out_png


def compare(dir_a: Path, dir_b: Path, *, histogram: Path, year: int | None = None,
            low: float = -1.0) -> tuple[list[TileComparison], tuple[float, float]]:
    """Compare every common tile-year and write the histogram of cosines in [low, 1]; returns the
    per-tile comparisons and the histogram's range (``low`` is raised to the lowest tenth below
    the smallest cosine, so that agreeing outputs get a fine histogram)."""
    results, all_cosines = [], []
    for a, b in common_tiles(Path(dir_a), Path(dir_b), year):
        comparison, cosine = compare_tile(a, b)
        results.append(comparison)
        all_cosines.append(cosine)
    cosines = np.concatenate(all_cosines)
    if cosines.size:
        low = max(low, np.floor(min(float(cosines.min()), 0.999) * 10) / 10)
    counts, _ = np.histogram(np.clip(cosines, low, 1.0), bins=HISTOGRAM_BINS, range=(low, 1.0))
    write_histogram(counts, Path(histogram))
    return results, (low, 1.0)
