"""Patch embeddings -> one tile in geotessera's layout: int8 codes + per-pixel float32 scales.

Memory stays bounded by the patch size: codes go straight into a memory-mapped .npy and each patch
is quantised on its own. Pixels without an embedding (outside the ROI, or no valid observation)
get code 0 and scale NaN, which geotessera dequantises to NaN.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import numpy as np

from tessera.errors import UserError
from tessera.grid import Tile
from tessera.io import atomic_path, sha256_file
from tessera.patches import PATCH_SUFFIX, read_patch_embedding

_PATCH_NAME = re.compile(r"^r(\d+)_c(\d+)$")
MATRYOSHKA_DIMS = (16, 32, 64, 128)


def patch_origin(path: Path) -> tuple[int, int]:
    """(row_off, col_off) of a patch file named r<row>_c<col>.npz."""
    match = _PATCH_NAME.match(path.stem)
    if not match or path.suffix != PATCH_SUFFIX:
        raise UserError(f"patch file {str(path)!r} is not named r<row>_c<col>{PATCH_SUFFIX}")
    return int(match.group(1)), int(match.group(2))


def _reserved_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy memmap whose disk space is reserved up front: a full disk then fails here with
    an OSError, not later with SIGBUS while writing through the mapping."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.path.getsize(path))
    return array


def assemble_tile(
    tile_name: str,
    patch_paths: list[Path],
    *,
    family: str,
    roi_mask_path: Path,
    embedding_path: Path,
    scales_path: Path,
    checksums_path: Path,
    landmask_path: Path,
    dims: int | None = None,
    float32_path: Path | None = None,
) -> None:
    """Quantise a tile's patch embeddings into geotessera's int8 + scales files.

    ``dims`` keeps only the first ``dims`` numbers of Matryoshka-ordered (v2) embeddings, quantised
    over that prefix as the reference does; ``float32_path`` also writes the unquantised (H, W, D)
    embedding (NaN = no embedding).
    """
    from tessera.infer import quantize
    from tessera.models import get_family

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
            # The landmask doubles as the ROI mask: 1 where the tile has (or should have) embeddings.
            with atomic_path(landmask_path) as tmp_landmask:
                shutil.copyfile(roi_mask_path, tmp_landmask)
                with atomic_path(checksums_path) as tmp_checksums:
                    tmp_checksums.write_text(
                        f"{sha256_file(tmp_embedding)}  {embedding_path.name}\n"
                        f"{sha256_file(tmp_scales)}  {scales_path.name}\n"
                    )
