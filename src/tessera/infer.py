"""Inference core: arrays in the reference per-patch layout → embeddings, devices, quantisation.

Time-step selection and normalisation belong to each model family (``model.family``); this module
runs the batches they prepare on a device and puts every pixel's embedding in its place. Pixels
that the caller marks invalid, or that have no valid observation in either sensor, are never
computed and come out as NaN.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tessera.errors import UserError
from tessera.io import atomic_path
from tessera.models import get_family, load_model
from tessera.models.base import REFERENCE_ARRAY_NAMES, Family

log = logging.getLogger(__name__)

_EMPTY_ALLOWED = ("sar_ascending", "sar_descending")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit CUDA request without CUDA is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was requested but this machine has no usable CUDA GPU: use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a torch device: use auto, cpu or cuda") from None


def cpu_threads(threads: int | None = None) -> int:
    """Threads for CPU inference: explicit value, else OMP_NUM_THREADS, else the cores this job may use."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads = {threads} must be at least 1: give a positive thread count")
        return threads
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_arrays(arrays: Mapping[str, np.ndarray], where: str = "input arrays") -> tuple[int, int]:
    """(H, W) of arrays in the reference layout; inconsistent shapes raise a UserError naming the array."""
    missing = [name for name in REFERENCE_ARRAY_NAMES if name not in arrays]
    if missing:
        raise UserError(f"{where} lack {', '.join(missing)}: provide all of {', '.join(REFERENCE_ARRAY_NAMES)}")
    bands = arrays["bands"]
    if bands.ndim != 4 or bands.shape[-1] != 10:
        raise UserError(f"{where}: bands has shape {bands.shape}, expected (T, H, W, 10)")
    steps, height, width = bands.shape[:3]
    expected = {
        "masks": (steps, height, width), "doys": (steps,),
        "sar_ascending": (None, height, width, 2), "sar_ascending_doy": (None,),
        "sar_descending": (None, height, width, 2), "sar_descending_doy": (None,),
    }
    for name, shape in expected.items():
        actual = arrays[name].shape
        if len(actual) != len(shape) or any(e is not None and a != e for a, e in zip(actual, shape)):
            raise UserError(f"{where}: {name} has shape {actual}, expected {shape} (None = any)")
    for orbit in _EMPTY_ALLOWED:
        if arrays[orbit].shape[0] != arrays[f"{orbit}_doy"].shape[0]:
            raise UserError(f"{where}: {orbit} has {arrays[orbit].shape[0]} time steps but {orbit}_doy has "
                            f"{arrays[f'{orbit}_doy'].shape[0]}: re-export the patch")
    return height, width


def embed_arrays(
    model: nn.Module,
    arrays: Mapping[str, np.ndarray],
    *,
    valid: np.ndarray | None = None,
    data_source: str = "mpc",
    seed: int = 0,
    device: str = "auto",
    batch_pixels: int = 4096,
    progress: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """float32 (H, W, D) embeddings of a patch; NaN where ``valid`` is False or nothing was observed.

    ``arrays`` holds the reference per-patch arrays (``bands`` ... ``sar_descending_doy``); ``model``
    comes from :func:`tessera.models.load_model`. ``batch_pixels`` pixels of up to 64 time steps
    make one batch (fewer pixels for longer series), so memory does not grow with the observations.
    """
    family: Family = model.family
    height, width = check_arrays(arrays)
    if batch_pixels < 1:
        raise UserError(f"batch_pixels = {batch_pixels} must be at least 1: give a positive batch size")
    if valid is None:
        pixels = np.arange(height * width, dtype=np.int64)
    else:
        if valid.shape != (height, width):
            raise ValueError(f"valid mask has shape {valid.shape}, the arrays are {(height, width)}")
        pixels = np.flatnonzero(valid)
    target = resolve_device(device)
    if target.type == "cpu":
        torch.set_num_threads(cpu_threads(threads))
    model.to(target)
    embeddings = np.full((height * width, family.embedding_dim(model.arch)), np.nan, np.float32)
    batches = family.prepare_batches(arrays, pixels, data_source=data_source, seed=seed, batch_pixels=batch_pixels)
    with torch.inference_mode(), tqdm(total=len(pixels), unit="px", disable=not progress) as bar:
        for batch in batches:
            output = model(batch.s2_x.to(target), batch.s1_x.to(target))
            embeddings[batch.pixels] = family.stored_embedding(output, model.arch).float().cpu().numpy()
            bar.update(len(batch.pixels))
    return embeddings.reshape(height, width, -1)


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


def read_reference_patch(patch_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The seven arrays of a reference per-patch directory, memory-mapped.

    ``bands.npy`` and ``doys.npy`` are required; a missing ``masks.npy`` means every step is valid
    (as the reference reads it); missing SAR files mean no SAR observations.
    """
    directory = Path(patch_dir)
    if not directory.is_dir():
        raise UserError(f"patch directory {str(directory)!r} does not exist: give a directory holding bands.npy")

    def load(name: str) -> np.ndarray | None:
        path = directory / f"{name}.npy"
        if not path.exists():
            return None
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as error:
            raise UserError(f"{path} is not a readable .npy file ({error}): re-export the patch") from None

    arrays = {name: load(name) for name in REFERENCE_ARRAY_NAMES}
    for required in ("bands", "doys"):
        if arrays[required] is None:
            raise UserError(f"patch directory {str(directory)!r} has no {required}.npy: it is not in the reference "
                            "per-patch layout")
    steps, height, width = arrays["bands"].shape[:3]
    if arrays["masks"] is None:
        arrays["masks"] = np.ones((steps, height, width), np.uint8)
    for orbit in _EMPTY_ALLOWED:
        if arrays[orbit] is None:
            arrays[orbit] = np.zeros((0, height, width, 2), np.int16)
        if arrays[f"{orbit}_doy"] is None:
            arrays[f"{orbit}_doy"] = np.zeros((0,), np.int16)
    check_arrays(arrays, where=f"patch directory {str(directory)!r}")
    return arrays


def embed_reference_patch(
    patch_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    family: str | None,
    out_npy: str | os.PathLike,
    data_source: str | None = None,
    *,
    trust_checkpoint: bool = False,
    device: str = "auto",
) -> np.ndarray:
    """Embed one reference per-patch directory into float32 (H, W, D) ``out_npy`` (NaN = no data).

    ``data_source`` (mpc or aws) picks the normalisation of families that have one per source; the
    reference default is mpc.
    """
    arrays = read_reference_patch(patch_dir)
    model = load_model(checkpoint, family, trust_checkpoint=trust_checkpoint)
    embedding = embed_arrays(model, arrays, data_source=data_source or "mpc", device=device)
    with atomic_path(out_npy) as tmp:
        np.save(tmp, embedding)
    log.info("embedded %s with %s: %d of %d pixels have an embedding", patch_dir, model.family.name,
             int((~np.isnan(embedding[..., 0])).sum()), embedding.shape[0] * embedding.shape[1])
    return embedding
