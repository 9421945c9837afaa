"""The assemble stage: patch embeddings -> one tile in geotessera's layout (int8 codes + per-pixel
float32 scales, the landmask, SHA256) and the tile's float32 Cloud-Optimized GeoTIFF.

Memory stays bounded by the patch size: codes go straight into a memory-mapped .npy and each patch
is quantised on its own. Pixels without an embedding (outside the ROI, or no valid observation)
get code 0 and scale NaN, which geotessera dequantises to NaN.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
from rasterio.enums import Resampling

from tessera.errors import UserError
from tessera.grid import Tile
from tessera.io import atomic_path, check_cog_complete, sha256_file
from tessera.layout import Results, WorkTile, patch_origin, read_patch_embedding
from tessera.models import family_entry
from tessera.models.quantisation import Quantisation
from tessera.options import available_cpus

if TYPE_CHECKING:
    from tessera.models.family import Family

MATRYOSHKA_DIMS = (16, 32, 64, 128)


def _reserved_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy memmap whose disk space is reserved up front: a full disk then fails here with
    an OSError, not later with SIGBUS while writing through the mapping."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.path.getsize(path))
    return array


def assemble_tile(tile: Tile, year: int, patch_paths: list[Path], *, family: str, work: WorkTile, results: Results,
                  dims: int | None = None, float32: bool = False, cog: bool = False, checkpoint: Path | None = None,
                  source: str | None = None, threads: int | None = None) -> None:
    """Everything the assemble rule makes for a tile-year: int8 codes, scales and SHA256 in
    geotessera's layout; the float32 embedding and the tile's COG (on the grid of the tile's ROI mask,
    tagged with the ``checkpoint``'s sha256 and the data ``source``) on request. (The landmask is the
    same for every year of a tile: the publish stage writes it.) ``threads`` compress the COG (default:
    the CPUs this process may use)."""
    quantise_tile(
        tile.name, patch_paths, family=family,
        embedding_path=results.embedding(tile.name, year), scales_path=results.scales(tile.name, year),
        checksums_path=results.checksums(tile.name, year), dims=dims,
        float32_path=results.float32(tile.name, year) if float32 else None,
    )
    if cog:
        tags = {"TESSERA_MODEL": family, "TESSERA_SOURCE": source, "TESSERA_YEAR": str(year),
                "TESSERA_CHECKPOINT_SHA256": sha256_file(checkpoint)}
        write_tile_cog(results.embedding(tile.name, year), results.scales(tile.name, year), work.roi_mask,
                       results.cog(tile.name, year), tags=tags, threads=threads)


def quantise_tile(
    tile_name: str,
    patch_paths: list[Path],
    *,
    family: str,
    embedding_path: Path,
    scales_path: Path,
    checksums_path: Path,
    dims: int | None = None,
    float32_path: Path | None = None,
) -> None:
    """Quantise a tile's patch embeddings into geotessera's int8 + scales files.

    ``dims`` keeps only the first ``dims`` numbers of Matryoshka-ordered (v2) embeddings, quantised
    over that prefix as the reference does; ``float32_path`` also writes the unquantised (H, W, D)
    embedding (NaN = no embedding).
    """
    tile = Tile.from_name(tile_name)
    quantiser = family_entry(family)
    if not patch_paths:
        raise UserError(f"no patch embeddings given for {tile_name}: run its inference first")
    dim = full_dim = read_patch_embedding(patch_paths[0]).shape[-1]
    if dims is not None:
        if not quantiser.matryoshka:
            raise UserError(f"export.dims = {dims} needs Matryoshka-ordered embeddings (model family v2); "
                            f"{quantiser.name} embeddings must be kept whole: remove export.dims")
        if dims not in MATRYOSHKA_DIMS or dims > dim:
            raise UserError(f"export.dims = {dims} is not one of {MATRYOSHKA_DIMS} up to {dim}: pick one of them")
        dim = dims
    scales = np.full((tile.height, tile.width), np.nan, np.float32)
    with contextlib.ExitStack() as stack:
        floats = None
        if float32_path is not None:
            tmp_floats = stack.enter_context(atomic_path(float32_path))
            floats = _reserved_memmap(tmp_floats, np.float32, (tile.height, tile.width, dim))
            floats[:] = np.nan
        tmp_embedding = stack.enter_context(atomic_path(embedding_path))
        codes = _reserved_memmap(tmp_embedding, np.int8, (tile.height, tile.width, dim))
        for path in patch_paths:
            row, col = patch_origin(path)
            embedding = read_patch_embedding(path)
            if embedding.shape[-1] != full_dim:
                raise UserError(f"patch {str(path)!r} has {embedding.shape[-1]} dims, {patch_paths[0].name} "
                                f"{full_dim}: the patches of {tile_name} come from different models; rerun their inference")
            embedding = embedding[..., :dim]
            height, width = embedding.shape[:2]
            if row + height > tile.height or col + width > tile.width:
                raise UserError(f"patch {str(path)!r} reaches outside tile {tile_name}: it belongs to another tile")
            quantize_into(embedding, quantiser.quantisation, codes[row:row + height, col:col + width],
                          scales[row:row + height, col:col + width])
            if floats is not None:
                floats[row:row + height, col:col + width] = embedding
        codes.flush()
        del codes
        if floats is not None:
            floats.flush()
            del floats
        with atomic_path(scales_path) as tmp_scales:
            np.save(tmp_scales, scales)
            with atomic_path(checksums_path) as tmp_checksums:
                tmp_checksums.write_text(
                    f"{sha256_file(tmp_embedding)}  {embedding_path.name}\n"
                    f"{sha256_file(tmp_scales)}  {scales_path.name}\n"
                )


def quantize(embedding: np.ndarray, family: str | Family | Quantisation) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel symmetric int8 codes (…, D) and float32 scales (…); NaN pixels → codes 0, scale NaN.

    Dequantise with ``codes * scales[..., None]``. Rounding is half-to-even as in the reference.
    ``family``: a family name (its quantisation read from the registry, without its model code), a
    family, or a :class:`Quantisation`.
    """
    if isinstance(family, str):
        spec = family_entry(family).quantisation
    else:
        spec = family if isinstance(family, Quantisation) else family.quantisation
    values = np.asarray(embedding, np.float32)
    codes = np.empty(values.shape, np.int8)
    scales = np.empty(values.shape[:-1], np.float32)
    quantize_into(values, spec, codes, scales)
    return codes, scales


# Values quantised at a time: the float32 temporaries stay a few MiB (a whole 512-px patch of
# 128 dims made five of 128 MiB each).
_QUANTISE_CHUNK_BYTES = 4 << 20


def quantize_into(embedding: np.ndarray, spec: Quantisation, codes: np.ndarray, scales: np.ndarray) -> None:
    """``quantize`` into ``codes`` (…, D) int8 and ``scales`` (…) float32 (views of the tile's arrays),
    a few rows at a time."""
    values = np.asarray(embedding, np.float32)
    if values.ndim == 1:
        values, codes, scales = values[None], codes[None], scales[None]
    row_bytes = max(values.nbytes // max(values.shape[0], 1), 1)
    step = max(1, _QUANTISE_CHUNK_BYTES // row_bytes)
    floor, divisor = np.float32(spec.scale_floor), np.float32(127)
    for start in range(0, values.shape[0], step):
        rows = slice(start, start + step)
        chunk = values[rows]
        # max|e| without an |e| temporary; NaN propagates as through np.abs(...).max().
        absmax = np.maximum(chunk.max(axis=-1), -chunk.min(axis=-1))
        if spec.floor_on_absmax:
            chunk_scales = np.maximum(absmax, floor) / divisor
        else:
            chunk_scales = np.maximum(absmax / divisor, floor)
        with np.errstate(invalid="ignore"):
            scaled = chunk / chunk_scales[..., None]
        np.rint(scaled, out=scaled)
        np.clip(scaled, spec.code_min, spec.code_max, out=scaled)
        scaled[np.isnan(scaled)] = 0
        codes[rows] = scaled
        scales[rows] = chunk_scales


# --- the tile's COG ----------------------------------------------------------------------

# Pixels dequantised at a time into the in-memory raster: the float32 transient stays ~16 MiB.
_DEQUANTISE_CHUNK_BYTES = 16 << 20
# GDAL's block cache defaults to 5 % of RAM; the COG writer needs far less (the in-memory raster
# is not cached).
_GDAL_CACHE_MB = 256
COG_BLOCK = 256


def write_tile_cog(embedding_path: Path, scales_path: Path, roi_mask_path: Path, out: Path, *, tags: dict[str, str],
                   threads: int | None = None) -> None:
    """Write a tile's dequantised float32 embedding as a Cloud-Optimized GeoTIFF.

    Pixel-interleaved (a pixel's vector is one read), NaN nodata, DEFLATE with the floating-point
    predictor, overviews averaged from the dequantised values (averaging int8 codes would be
    meaningless), band descriptions as geotessera's exports (Tessera_Band_i). The COG covers the
    rows and columns of the tile grid that hold embeddings (on the tile grid, so it still mosaics
    without resampling): compressing and averaging all-NaN bands of a mostly empty tile took minutes.
    ``threads`` compress (GDAL's NUM_THREADS; default: the CPUs this process may use).

    The dequantised embedding and its overviews are built in a band-interleaved in-memory raster
    (GDAL's MEM driver), which GDAL's COG driver then compresses once into the pixel-interleaved
    COG. Band-interleaved because GDAL averages overviews band by band: from a pixel-interleaved
    raster each band's pass strides over every pixel's vector, 6 times slower at 128 bands (the
    same bytes either way). Memory is bounded by the tile: 4 bytes x dims per pixel of the data
    window, plus a third of that for the overviews (570 MiB for a full 128-dim tile at 52° N).
    A tiled GeoTIFF staging file took time quadratic in the number of bands: GDAL reads a
    pixel-interleaved file band by band, decoding every block once per band, both for the
    overviews and for the copy (a full 128-dim tile: over 10 minutes; benchmarks/assemble.py).
    """
    codes = np.load(embedding_path, mmap_mode="r")
    scales = np.load(scales_path, mmap_mode="r")
    with rasterio.open(roi_mask_path) as grid:  # the tile's grid
        crs, transform = grid.crs, grid.transform
    window = data_window(scales)
    codes = codes[window.toslices()]
    scales = scales[window.toslices()]
    transform = rasterio.windows.transform(window, transform)
    height, width, dims = codes.shape
    step = max(1, _DEQUANTISE_CHUNK_BYTES // max(width * dims * 4, 1))
    with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_MB), atomic_path(out) as tmp:
        with rasterio.open("", "w", driver="MEM", width=width, height=height, count=dims, dtype="float32", crs=crs,
                           transform=transform, nodata=float("nan"), interleave="band") as raster:
            for row in range(0, height, step):
                rows = slice(row, min(row + step, height))
                # (bands, rows, cols) in C order, as the raster holds them (numpy would keep the codes'
                # pixel-interleaved layout, which rasterio then copies at a stride): codes × scale in float32.
                block = np.multiply(np.moveaxis(codes[rows], -1, 0), scales[rows], dtype=np.float32, order="C")
                raster.write(block, window=rasterio.windows.Window(0, row, width, rows.stop - row))
            del codes, scales  # unmapped: their pages no longer count against the job's memory
            raster.descriptions = tuple(f"Tessera_Band_{i}" for i in range(dims))
            raster.update_tags(AREA_OR_POINT="Area", **tags)
            # The levels the COG driver would make itself; given as the source's overviews, it copies them.
            raster.build_overviews(cog_overview_factors(width, height), Resampling.average)
            rasterio.shutil.copy(
                raster, tmp, driver="COG", compress="DEFLATE", predictor=3, blocksize=COG_BLOCK,
                overview_resampling="average", bigtiff="IF_SAFER", num_threads=str(threads or available_cpus()),
            )
        check_cog_complete(tmp)


# Peak memory of assemble_tile with the COG, measured (benchmarks/assemble.py, a full tile at
# 52° N whose COG covers its 717 x 1118 = 801,606 px data window, what the rule passes; 2 threads):
# 1,004 MiB at 128 dims, 6,886 MiB at 1,024: 165 MiB + 8.57 and 8.59 bytes per pixel and number. Per pixel and number: 4 bytes of the in-memory raster, 1.33 of its overviews,
# and ~3 of GDAL's compression buffers in the COG copy (they grow with the threads: ~1.5 with one).
_MEMORY_BASE_BYTES = 165 * 2**20
_MEMORY_BYTES_PER_VALUE = 8.6
ASSEMBLE_THREADS = 2  # what the constants were measured with, and the rule's threads


def memory_mb(pixels: int, dims: int, patch_pixels: int = 0, *, float32: bool = False, cog: bool = True) -> int:
    """MB to ask for an assemble job of a tile whose ROI covers ``pixels`` with ``dims`` numbers per
    pixel, read from patches of up to ``patch_pixels``: the measured peak of the COG (if one is
    written), or of the quantisation (one patch in float32, the codes, and the float32 export if
    asked for) where that is more; plus a fifth, and at least 1,000 (a retry asks for a multiple of it)."""
    cog = _MEMORY_BYTES_PER_VALUE * pixels * dims if cog else 0
    quantise = (4 * patch_pixels + (5 if float32 else 1) * pixels) * dims
    return max(1000, int(1.2 * (_MEMORY_BASE_BYTES + max(cog, quantise)) / 1e6) + 1)


def cog_overview_factors(width: int, height: int, block: int = COG_BLOCK) -> list[int]:
    """Overview factors as GDAL's COG driver picks them: halve until the level fits in one block."""
    factors = []
    while width > block or height > block:
        width, height = (width + 1) // 2, (height + 1) // 2
        factors.append(2 ** (len(factors) + 1))
    return factors


def data_window(scales: np.ndarray) -> rasterio.windows.Window:
    """The smallest window holding every pixel with an embedding (the whole grid if there is none)."""
    valid = np.isfinite(scales)
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return rasterio.windows.Window(0, 0, scales.shape[1], scales.shape[0])
    return rasterio.windows.Window(cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
