"""The infer stage: embed patches of a tile's stack, one float32 ``.npz`` per patch.

Also the reference per-patch layout both ways: embed a directory in that layout
(``tessera embed-patch``), and write our stacks in it (``tessera export-patches``) for the
reference tools. The engine that runs a model over arrays is ``tessera.models.engine``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.windows import Window

from tessera.errors import UserError
from tessera.grid import patches as work_window_patches
from tessera.io import atomic_path
from tessera.layout import (
    patch_name,
    read_reference_patch,
    read_reference_roi,
    reference_patch_name,
    write_patch_embedding,
    write_reference_patch,
)
from tessera.options import InferOptions
from tessera.roi import read_roi_mask

log = logging.getLogger(__name__)


# Measured peaks of one infer job (benchmarks/fulltile.py: a whole tile with a year of demo scenes,
# 60 S2 dates and 61 S1 passes; v2 at its published small size, a 28 MB checkpoint of seeded random
# weights, 128 numbers per pixel, on the CPU;
# README "One tile, stage by stage"): 3,370 MiB with 512 px patches, 2,644 MiB with 256 px ones,
# i.e. 2,402 MiB whatever the patch (Python, torch, a batch of 4,096 pixels of up to 64 steps) plus
# 3.8 KiB per patch pixel (its stacks, read and padded, and its embeddings).
_MEMORY_BASE_MIB = 2402
_MEMORY_MIB_PER_PIXEL = 0.003693
_MEASURED_DIMS = 128


def memory_mb(patch_pixels: int, dims: int, checkpoint_bytes: int) -> int:
    """MB to ask for an infer job of patches of up to ``patch_pixels``, a family of ``dims`` numbers
    per pixel and a checkpoint of ``checkpoint_bytes``: the measured peak, plus the weights (held
    once: the checkpoint is memory-mapped and the model takes its tensors over; the measured 28 MB
    are counted twice, which errs high) and float32 outputs
    beyond the measured 128 numbers (both estimated, not measured), with 10 % to spare. The per-pixel
    part grows with a tile's dates (twice the demo's is what the first retry asks for); on a GPU node
    the host also holds CUDA's libraries, not measured here."""
    per_pixel_mib = _MEMORY_MIB_PER_PIXEL + max(0, dims - _MEASURED_DIMS) * 4 / 2**20
    mib = _MEMORY_BASE_MIB + per_pixel_mib * patch_pixels + checkpoint_bytes / 2**20
    return 100 * math.ceil(1.1 * mib * 2**20 / 1e6 / 100)


def tile_seed(seed: int, tile: str) -> int:
    """The seed of one tile in a run: random time-step selection (v1.0 families) then depends on
    (run seed, tile, tile pixel) only, so that overlapping runs and any patch layout agree."""
    digest = hashlib.sha256(f"{seed}/{tile}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def infer_patches(
    stack_index: Path,
    patches: list[Window],
    *,
    roi_mask_path: Path,
    checkpoint: Path,
    family: str | None,
    options: InferOptions,
    out_dir: Path,
) -> list[Path]:
    """Embed each patch (tile pixel windows) and write ``out_dir/r<row>_c<col>.npz``.

    float32 (h, w, D); NaN where the pixel is outside the ROI or had no valid observation.
    """
    from tessera.models import load_model
    from tessera.models.engine import Embedder, check_preprocessing, data_kind_for
    from tessera.stack import read_window, verify_stack_index

    # Structure only: re-hashing the whole tile stack per patch would cost more than inference on a
    # GPU; chunk contents carry CRC-32Cs that every read verifies.
    stack = verify_stack_index(stack_index, checksums=False)
    tile, (col_off, row_off) = stack.index["tile"], stack.index["window"][:2]
    model = load_model(checkpoint, family, trust_checkpoint=options.trust_checkpoint)
    data_kind = data_kind_for(model, stack.index["data_kind"], allow_mismatch=options.allow_source_mismatch,
                              data=f"stack {stack_index}")
    check_preprocessing(model.family, stack.index["preprocessing"], allow_mismatch=options.allow_preprocessing_mismatch,
                        data=f"stack {stack_index}")
    embedder = Embedder(model, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for patch in patches:
        out = out_dir / f"{patch_name(patch)}.npz"
        started = time.perf_counter()
        in_stack = Window(patch.col_off - col_off, patch.row_off - row_off, patch.width, patch.height)
        arrays = read_window(stack.s2_path, stack.s1_path, in_stack)
        valid = read_roi_mask(roi_mask_path, window=patch)
        embedding = embedder.embed(arrays, valid=valid, data_kind=data_kind, seed=tile_seed(options.seed, tile),
                                   origin=(patch.row_off, patch.col_off), progress=True)
        write_patch_embedding(out, embedding)
        seconds = time.perf_counter() - started
        log.info("%s %s: %d ROI pixels in %.1f s (%.0f px/s), %d of them never observed (no-data)", tile,
                 patch_name(patch), valid.sum(), seconds, valid.sum() / max(seconds, 1e-9),
                 int(np.isnan(embedding[valid][:, 0]).sum()))
        written.append(out)
    return written


def embed_reference_patch(
    patch_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    family: str | None,
    out_npy: str | os.PathLike,
    data_kind: str | None = None,
    options: InferOptions = InferOptions(),
) -> np.ndarray:
    """Embed one reference per-patch directory into float32 (H, W, D) ``out_npy`` (NaN = no data).

    Pixels outside the directory's ``roi.tiff`` (when it has one) are no-data. ``data_kind``
    (mpc or aws) picks the normalisation of families that have one per kind of data; by default the
    one the checkpoint was trained on, else mpc (the reference's default).
    """
    from tessera.models import load_model
    from tessera.models.engine import Embedder, data_kind_for

    arrays = read_reference_patch(patch_dir)
    valid = read_reference_roi(patch_dir, arrays["bands"].shape[1:3])
    model = load_model(checkpoint, family, trust_checkpoint=options.trust_checkpoint)
    data_kind = data_kind_for(model, data_kind, allow_mismatch=options.allow_source_mismatch, data=f"patch {patch_dir}")
    embedding = Embedder(model, options).embed(arrays, valid=valid, data_kind=data_kind)
    with atomic_path(out_npy) as tmp:
        np.save(tmp, embedding)
    log.info("embedded %s with %s: %d of %d pixels have an embedding", patch_dir, model.family.name,
             int((~np.isnan(embedding[..., 0])).sum()), embedding.shape[0] * embedding.shape[1])
    return embedding


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
    retiler pads edge patches, and ``roi.tiff`` with the window's CRS and transform shifted to the
    patch. Patches without an ROI pixel are skipped, as the reference does.
    """
    from tessera.stack import read_window, verify_stack_index

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
        arrays = read_window(stack.s2_path, stack.s1_path, Window(col, row, patch_size, patch_size))
        final = out_dir / reference_patch_name(col, row, width, height, patch_size)
        written.append(write_reference_patch(final, arrays, padded_roi, crs=stack.index["crs"],
                                             transform=transform @ Affine.translation(col, row)))
    log.info("exported %d of %d patches of %s to %s", len(written), len(patches), stack.index["tile"], out_dir)
    return written
