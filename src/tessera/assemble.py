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

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows
from rasterio.enums import Resampling

from tessera.errors import UserError
from tessera.grid import Tile
from tessera.io import atomic_path, check_raster_complete, sha256_file
from tessera.layout import Results, WorkTile, patch_origin, read_patch_embedding
from tessera.models import get_family
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
                  source: str | None = None) -> None:
    """Everything the assemble rule makes for a tile-year: int8 codes, scales and SHA256 in
    geotessera's layout; the float32 embedding and the tile's COG (on the grid of the tile's ROI mask,
    tagged with the ``checkpoint``'s sha256 and the data ``source``) on request. (The landmask is the
    same for every year of a tile: the publish stage writes it.)"""
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
                       results.cog(tile.name, year), tags=tags)


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
    quantiser = get_family(family)
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
            patch_codes, patch_scales = quantize(embedding, quantiser)
            codes[row:row + height, col:col + width] = patch_codes
            scales[row:row + height, col:col + width] = patch_scales
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


def quantize(embedding: np.ndarray, family: str | Family) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel symmetric int8 codes (…, D) and float32 scales (…); NaN pixels → codes 0, scale NaN.

    Dequantise with ``codes * scales[..., None]``. Rounding is half-to-even as in the reference.
    """
    spec = get_family(family).quantisation
    values = np.asarray(embedding, np.float32)
    absmax = np.abs(values).max(axis=-1)
    if spec.floor_on_absmax:
        scales = np.maximum(absmax, np.float32(spec.scale_floor)) / np.float32(127)
    else:
        scales = np.maximum(absmax / np.float32(127), np.float32(spec.scale_floor))
    scales = scales.astype(np.float32)
    with np.errstate(invalid="ignore"):
        codes = np.clip(np.rint(values / scales[..., None]), spec.code_min, spec.code_max)
    codes = np.nan_to_num(codes, nan=0.0).astype(np.int8)
    return codes, scales


# --- the tile's COG ----------------------------------------------------------------------

# Rows dequantised at a time into the in-memory raster: small enough that the float32 transient
# stays a few tens of MiB at 128 dims.
_ROWS_PER_BLOCK = 64
# GDAL's block cache defaults to 5 % of RAM; the COG writer needs far less (the in-memory raster
# is not cached).
_GDAL_CACHE_MB = 256
COG_BLOCK = 256


def write_tile_cog(embedding_path: Path, scales_path: Path, roi_mask_path: Path, out: Path, *, tags: dict[str, str]) -> None:
    """Write a tile's dequantised float32 embedding as a Cloud-Optimized GeoTIFF.

    Pixel-interleaved (a pixel's vector is one read), NaN nodata, DEFLATE with the floating-point
    predictor, overviews averaged from the dequantised values (averaging int8 codes would be
    meaningless), band descriptions as geotessera's exports (Tessera_Band_i). The COG covers the
    rows and columns of the tile grid that hold embeddings (on the tile grid, so it still mosaics
    without resampling): compressing and averaging all-NaN bands of a mostly empty tile took minutes.

    The dequantised embedding and its overviews are built in a pixel-interleaved in-memory raster
    (GDAL's MEM driver), which GDAL's COG driver then compresses once. Memory is bounded by the
    tile: 4 bytes x dims per pixel of the data window, plus a third of that for the overviews
    (570 MiB for a full 128-dim tile at 52° N). A tiled GeoTIFF staging file took time quadratic in
    the number of bands: GDAL reads a pixel-interleaved file band by band, decoding every block
    once per band, both for the overviews and for the copy (a full 128-dim tile: over 10 minutes,
    against 12 s from memory; benchmarks/assemble.py).
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
    with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_MB), atomic_path(out) as tmp:
        with rasterio.open("", "w", driver="MEM", width=width, height=height, count=dims, dtype="float32", crs=crs,
                           transform=transform, nodata=float("nan"), interleave="pixel") as raster:
            for row in range(0, height, _ROWS_PER_BLOCK):
                rows = slice(row, min(row + _ROWS_PER_BLOCK, height))
                block = codes[rows].astype(np.float32)
                block *= scales[rows, :, None]
                raster.write(np.moveaxis(block, -1, 0), window=rasterio.windows.Window(0, row, width, rows.stop - row))
            raster.descriptions = tuple(f"Tessera_Band_{i}" for i in range(dims))
            raster.update_tags(AREA_OR_POINT="Area", **tags)
            # The levels the COG driver would make itself; given as the source's overviews, it copies them.
            raster.build_overviews(cog_overview_factors(width, height), Resampling.average)
            rasterio.shutil.copy(
                raster, tmp, driver="COG", compress="DEFLATE", predictor=3, blocksize=COG_BLOCK,
                overview_resampling="average", bigtiff="IF_SAFER", num_threads=str(os.cpu_count() or 1),
            )
        check_raster_complete(tmp)


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
