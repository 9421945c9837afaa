"""The inference stage: embed patches of a tile's stack and write one float32 .npy per patch."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from tessera.grid import patch_name
from tessera.io import atomic_path
from tessera.roi import read_roi_mask

log = logging.getLogger(__name__)

# Which normalisation table a family uses for data from each source: v1.1 was trained separately
# on Planetary Computer and on Earth Search/OPERA data; the demo source mimics Planetary Computer.
NORMALISATION_SOURCE = {"demo": "mpc", "mpc": "mpc", "aws": "aws", "stac": "mpc"}


def patch_seed(seed: int, tile: str, patch: Window) -> int:
    """A seed per (run seed, tile, patch): random time-step selection is reproducible per patch
    and independent of how patches are batched into jobs."""
    digest = hashlib.sha256(f"{seed}/{tile}/{patch.row_off}/{patch.col_off}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def embed_stack_patches(
    stack_index: Path,
    patches: list[Window],
    *,
    roi_mask_path: Path,
    checkpoint: Path,
    family: str | None,
    trust_checkpoint: bool = False,
    device: str = "auto",
    seed: int = 0,
    batch_pixels: int = 4096,
    threads: int | None = None,
    out_dir: Path,
) -> list[Path]:
    """Embed each patch (tile pixel windows) and write ``out_dir/r<row>_c<col>.npy``.

    float32 (h, w, D); NaN where the pixel is outside the ROI or had no valid observation.
    """
    from tessera.infer import embed_arrays
    from tessera.models import load_model
    from tessera.stack import read_window, verify_stack_index

    # Structure only: re-hashing the whole tile stack per patch would cost more than inference on a
    # GPU; chunk contents carry zstd checksums that every read verifies.
    stack = verify_stack_index(stack_index, checksums=False)
    tile, (col_off, row_off) = stack.index["tile"], stack.index["window"][:2]
    data_source = NORMALISATION_SOURCE[stack.index["source"]]
    model = load_model(checkpoint, family, trust_checkpoint=trust_checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for patch in patches:
        out = out_dir / f"{patch_name(patch)}.npy"
        started = time.perf_counter()
        in_stack = Window(patch.col_off - col_off, patch.row_off - row_off, patch.width, patch.height)
        arrays = read_window(stack.s2_path, stack.s1_path, in_stack)
        valid = read_roi_mask(roi_mask_path, window=patch)
        embedding = embed_arrays(
            model, arrays, valid=valid, data_source=data_source, seed=patch_seed(seed, tile, patch),
            device=device, batch_pixels=batch_pixels, threads=threads, progress=True,
        )
        with atomic_path(out) as tmp:
            np.save(tmp, embedding)
        seconds = time.perf_counter() - started
        log.info("%s %s: %d ROI pixels in %.1f s (%.0f px/s), %d of them never observed (no-data)", tile,
                 patch_name(patch), valid.sum(), seconds, valid.sum() / max(seconds, 1e-9),
                 int(np.isnan(embedding[valid][:, 0]).sum()))
        written.append(out)
    return written
