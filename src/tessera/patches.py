"""Patches of a tile's stack: embed them (one float32 .npz each) or export them in the reference layout."""

from __future__ import annotations

import hashlib
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from tessera.errors import DamagedIntermediate, UserError
from tessera.grid import patch_name
from tessera.grid import patches as work_window_patches
from tessera.io import atomic_path
from tessera.roi import read_roi_mask

log = logging.getLogger(__name__)


# A patch embedding is one array in an .npz: the zip entry's CRC-32, which numpy's loader checks
# on every read, catches a damaged file that a bare .npy would load as wrong numbers.
PATCH_SUFFIX = ".npz"
_PATCH_ARRAY = "embedding"


def write_patch_embedding(path: Path, embedding: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **{_PATCH_ARRAY: embedding})


def read_patch_embedding(path: Path) -> np.ndarray:
    """A patch embedding written by ``write_patch_embedding``; a damaged file is a DamagedIntermediate."""
    try:
        with np.load(path) as archive:
            return archive[_PATCH_ARRAY]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise DamagedIntermediate(path, str(error)) from None


def tile_seed(seed: int, tile: str) -> int:
    """The seed of one tile in a run: random time-step selection (v1.0 families) then depends on
    (run seed, tile, tile pixel) only, so that overlapping runs and any patch layout agree."""
    digest = hashlib.sha256(f"{seed}/{tile}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def embed_stack_patches(
    stack_index: Path,
    patches: list[Window],
    *,
    roi_mask_path: Path,
    checkpoint: Path,
    family: str | None,
    trust_checkpoint: bool = False,
    allow_source_mismatch: bool = False,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    repeat_times: int = 1,
    batch_pixels: int = 4096,
    threads: int | None = None,
    out_dir: Path,
) -> list[Path]:
    """Embed each patch (tile pixel windows) and write ``out_dir/r<row>_c<col>.npz``.

    float32 (h, w, D); NaN where the pixel is outside the ROI or had no valid observation.
    ``repeat_times`` random draws per pixel are averaged (v1.0 families; 1 for the others).
    """
    from tessera.infer import Embedder, normalisation_for
    from tessera.models import load_model
    from tessera.stack import read_window, verify_stack_index

    # Structure only: re-hashing the whole tile stack per patch would cost more than inference on a
    # GPU; chunk contents carry zstd checksums that every read verifies.
    stack = verify_stack_index(stack_index, checksums=False)
    tile, (col_off, row_off) = stack.index["tile"], stack.index["window"][:2]
    model = load_model(checkpoint, family, trust_checkpoint=trust_checkpoint)
    data_source = normalisation_for(model, stack.index["normalisation"], allow_mismatch=allow_source_mismatch,
                                    data=f"stack {stack_index}")
    embedder = Embedder(model, device=device, precision=precision, threads=threads, batch_pixels=batch_pixels)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for patch in patches:
        out = out_dir / f"{patch_name(patch)}{PATCH_SUFFIX}"
        started = time.perf_counter()
        in_stack = Window(patch.col_off - col_off, patch.row_off - row_off, patch.width, patch.height)
        arrays = read_window(stack.s2_path, stack.s1_path, in_stack)
        valid = read_roi_mask(roi_mask_path, window=patch)
        embedding = embedder.embed(
            arrays, valid=valid, data_source=data_source, seed=tile_seed(seed, tile),
            origin=(patch.row_off, patch.col_off), repeat_times=repeat_times, progress=True,
        )
        write_patch_embedding(out, embedding)
        seconds = time.perf_counter() - started
        log.info("%s %s: %d ROI pixels in %.1f s (%.0f px/s), %d of them never observed (no-data)", tile,
                 patch_name(patch), valid.sum(), seconds, valid.sum() / max(seconds, 1e-9),
                 int(np.isnan(embedding[valid][:, 0]).sum()))
        written.append(out)
    return written


def reference_patch_name(col: int, row: int, width: int, height: int, size: int) -> str:
    """``<x_min>_<y_min>_<x_max>_<y_max>`` as the reference retiler names a patch of a
    ``width`` × ``height`` grid: columns and rows of its top-left pixel, then that plus ``size``,
    clipped to the grid."""
    return f"{col}_{row}_{min(col + size, width)}_{min(row + size, height)}"


def export_patches(
    stack_index: Path,
    patches: list[Window] | None,
    out_dir: Path,
    *,
    roi_mask_path: Path,
    patch_size: int,
) -> list[Path]:
    """Write patches of a tile's stack in the reference per-patch layout, for the reference tools.

    ``patches`` are windows in tile pixels inside the work window (as ``tessera.grid.patches``
    cuts it; None: all of them, cut at ``patch_size``). Each becomes
    ``out_dir/<x_min>_<y_min>_<x_max>_<y_max>/`` in the coordinates of the work window (the
    reference's ROI grid): the seven ``.npy`` arrays zero-padded to ``patch_size`` square, as the
    retiler pads edge patches, and ``roi.tiff`` (uint8 0/1, LZW, tiled 256, the window's CRS and
    transform shifted to the patch, no nodata tag). Patches without an ROI pixel are skipped, as
    the reference does. Each directory appears complete or not at all.
    """
    from tessera.stack import export_reference_patch, verify_stack_index

    stack = verify_stack_index(stack_index, checksums=False)
    col_off, row_off, width, height = stack.index["window"]
    transform = Affine(*stack.index["transform"][:6])
    if patches is None:
        patches = work_window_patches(Window(col_off, row_off, width, height), patch_size)
    written = []
    for patch in patches:
        if max(patch.width, patch.height) > patch_size:
            raise UserError(f"patch {patch_name(patch)} is {patch.width} x {patch.height} pixels, larger than "
                            f"patch_size {patch_size}: cut the windows with the same patch size")
        if not (col_off <= patch.col_off and patch.col_off + patch.width <= col_off + width
                and row_off <= patch.row_off and patch.row_off + patch.height <= row_off + height):
            raise UserError(f"patch {patch_name(patch)} ({patch.width} x {patch.height}) reaches outside the work "
                            f"window {stack.index['window']} of {stack.index['tile']}: give patches inside it")
        roi = read_roi_mask(roi_mask_path, window=patch)
        if not roi.any():
            continue
        col, row = patch.col_off - col_off, patch.row_off - row_off
        padded_roi = np.zeros((patch_size, patch_size), np.uint8)
        padded_roi[:roi.shape[0], :roi.shape[1]] = roi
        final = out_dir / reference_patch_name(col, row, width, height, patch_size)
        with atomic_path(final, directory=True) as staging:
            export_reference_patch(stack.s2_path, stack.s1_path, Window(col, row, patch_size, patch_size), staging)
            profile = dict(driver="GTiff", width=patch_size, height=patch_size, count=1, dtype="uint8",
                           crs=stack.index["crs"], transform=transform @ Affine.translation(col, row),
                           compress="lzw", tiled=True, blockxsize=256, blockysize=256)
            with rasterio.open(staging / "roi.tiff", "w", **profile) as dst:
                dst.write(padded_roi, 1)
        written.append(final)
    log.info("exported %d of %d patches of %s to %s", len(written), len(patches), stack.index["tile"], out_dir)
    return written
