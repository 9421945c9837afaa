"""The inference engine: arrays in the reference per-patch layout → embeddings, on a device.

Time-step selection and normalisation belong to each model family (``model.family``); an
:class:`Embedder` runs the batches they prepare on a device and puts every pixel's embedding in
its place. Pixels that the caller marks invalid, or that have no valid observation in either
sensor, are never computed and come out as NaN.

Running a batch: its rows are padded with zero rows to a multiple of :data:`ROW_MULTIPLE`,
because CPU matmul kernels over fewer rows round differently; with the padding a pixel's
embedding is bit-identical whatever batch it lands in (patch layout, bucket sizes, batch size).
On a GPU the patch's codes are copied there once and each batch's inputs are gathered, cast and
standardised there (the CPU only chooses the time steps), one batch ahead in a background thread;
on a CPU preparation takes well under 1 % of the forward time and would only compete with its
threads, so it runs inline. When the device runs out of memory the rows per forward pass are
halved for the rest of the run.

Precision (``precision``): ``fp32``; ``bf16`` (autocast: matmuls in bfloat16, accumulation and
outputs in float32); ``int8`` (CPU only: Linear layers dynamically quantised, an approximation on
request); ``auto`` = what the reference ran the family in: bf16 autocast on CUDA GPUs with bfloat16
support for families whose ``bf16_on_cuda`` is set (v1.1, whose reference config turns CUDA
autocast on), fp32 otherwise (v1.0, v1.0-QAT and the v2 students run in fp32 in the reference;
the teacher's bf16 is opt-in there too). bf16 elsewhere only when asked.
``benchmarks/infer.py`` prints bf16's difference to fp32 per family: with seeded random weights,
every pixel's RMS difference is below the int8 storage error (scale / √12) and cosine to fp32
> 0.9999; pass it a published checkpoint to check real weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tessera.errors import UserError
from tessera.layout import check_reference_arrays
from tessera.models.family import Batch, Family
from tessera.options import PRECISIONS, InferOptions, available_cpus

log = logging.getLogger(__name__)

# Rows of a forward pass are padded to a multiple of this (see the module docstring).
ROW_MULTIPLE = 8


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


def resolve_precision(precision: str, family: Family, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``int8`` for a requested precision on a device (see the module docstring)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}: pick one of those")
    native_bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if device.type == "cuda" and family.bf16_on_cuda and native_bf16 else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise UserError(f"precision int8 (dynamic quantisation) runs on the CPU only, not on {device}: "
                        "use precision auto, fp32 or bf16 on a GPU")
    if precision == "bf16" and not native_bf16:
        raise UserError(f"precision bf16 was requested but {torch.cuda.get_device_name(device)} has no bfloat16 "
                        "support: use precision auto or fp32")
    return precision


def precision_in_effect(precision: str, family: Family, device: str) -> str:
    """What ``resolve_precision`` gives on the device a run may land on, in words (for provenance)."""
    if precision != "auto":
        return precision
    if not family.bf16_on_cuda or device == "cpu":
        return "fp32"
    return "bf16 on CUDA GPUs with bfloat16 support, else fp32"


def cpu_threads(threads: int | None = None) -> int:
    """Threads for CPU inference: explicit value, else OMP_NUM_THREADS, else the cores this job may use."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads = {threads} must be at least 1: give a positive thread count")
        return threads
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return available_cpus()



_INPUTS = ("s2_bands", "s2_doys", "s1_bands", "s1_doys")


def _padded(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The input tensors with zero rows appended up to a multiple of :data:`ROW_MULTIPLE` rows."""
    missing = -inputs[0].shape[0] % ROW_MULTIPLE
    if not missing:
        return inputs
    return [torch.cat([t, t.new_zeros(missing, *t.shape[1:])]) for t in inputs]


def _quantised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear layers compute in int8 (weights per tensor, activations per batch).

    The temporal pooling (``attn_pool``) stays float: its recurrent cells read their weights
    directly, and rounding errors would compound over the time steps. Attention's output
    projection (a Linear subclass the fused attention reads directly) stays float too.
    """
    layers = {name: torch.ao.quantization.default_dynamic_qconfig for name, module in model.named_modules()
              if type(module) is nn.Linear and ".attn_pool." not in f".{name}."}
    with warnings.catch_warnings():  # torch marks eager-mode quantisation as deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), layers, dtype=torch.qint8)
    quantised.family, quantised.arch = model.family, model.arch
    return quantised


@contextlib.contextmanager
def _fastpath_disabled() -> Iterator[None]:
    """nn.TransformerEncoderLayer's fused path reads Linear weights directly, which quantised layers lack."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


_DONE = object()


def _prepared_ahead(batches: Iterator[Batch], prepare) -> Iterator[Batch]:
    """``prepare(batch)`` for each batch, computed one batch ahead in a background thread."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not hand_over(prepare(batch)):
                    return
            hand_over(_DONE)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consuming thread
            hand_over(error)

    worker = threading.Thread(target=produce, name="tessera-prepare-batches", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


class Embedder:
    """A model ready to embed patches on one device, at one precision.

    Create it once per run and call :meth:`embed` per patch. ``batch_pixels`` pixels of up to 64
    time steps make one batch (the families give longer series fewer pixels), so memory does not
    grow with the observations; on a GPU out-of-memory error the rows per pass are halved.
    """

    def __init__(self, model: nn.Module, options: InferOptions = InferOptions()):
        if options.batch_pixels < 1:
            raise UserError(f"batch_pixels = {options.batch_pixels} must be at least 1: give a positive batch size")
        self.options = options
        self.family: Family = model.family
        self.batch_pixels = min(options.batch_pixels, self.family.max_batch_pixels)
        self.arch = model.arch
        self.device = resolve_device(options.device)
        self.precision = resolve_precision(options.precision, self.family, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(options.threads))
        model.to(self.device)
        self.model = _quantised(model) if self.precision == "int8" else model
        # Rows per forward pass, lowered after an out-of-memory error; None = a whole batch.
        self.max_rows: int | None = None

    def embed(self, arrays: Mapping[str, np.ndarray], *, valid: np.ndarray | None = None, data_kind: str = "mpc",
              seed: int | None = None, origin: tuple[int, int] = (0, 0), progress: bool = False) -> np.ndarray:
        """float32 (H, W, D) embeddings of a patch; NaN where ``valid`` is False or nothing was observed.

        ``origin`` is the tile row and column of the patch's first pixel, ``seed`` the run's seed for
        the tile (default: the options' seed): the v1.0 families' random draws follow (seed, tile
        pixel), whatever the patch layout. ``options.repeat_times`` draws per pixel are averaged
        (v1.0 families). ``data_kind`` (mpc or aws) picks the normalisation of families that have
        one per kind of data.
        """
        height, width = check_reference_arrays(arrays)
        seed = self.options.seed if seed is None else seed
        if valid is None:
            pixels = np.arange(height * width, dtype=np.int64)
        else:
            if valid.shape != (height, width):
                raise ValueError(f"valid mask has shape {valid.shape}, the arrays are {(height, width)}")
            pixels = np.flatnonzero(valid)
        embeddings = np.full((height * width, self.family.embedding_dim(self.arch)), np.nan, np.float32)
        # On a GPU the inputs are gathered there; on a CPU numpy gathers faster than torch.
        batches = self.family.prepare_batches(arrays, pixels, data_kind=data_kind, seed=seed,
                                              batch_pixels=self.batch_pixels,
                                              repeat_times=self.options.repeat_times,
                                              origin=origin, device=self.device if self.device.type == "cuda" else None)
        if self.device.type == "cuda":
            batches = _prepared_ahead(batches, self._staged)
        else:
            batches = map(self._staged, batches)
        with torch.inference_mode(), tqdm(total=len(pixels), unit="px", disable=not progress) as bar:
            for batch in batches:
                embeddings[batch.pixels] = self.embed_batch(batch)
                bar.update(len(batch.pixels))
        return embeddings.reshape(height, width, -1)

    def _staged(self, batch: Batch) -> Batch:
        """The batch with padded rows; rows still on the CPU go to pinned memory when bound for a GPU."""
        inputs = _padded([getattr(batch, name) for name in _INPUTS])
        if self.device.type == "cuda":
            inputs = [t.pin_memory() if t.device.type == "cpu" else t for t in inputs]
        return Batch(batch.pixels, *inputs, repeats=batch.repeats)

    def embed_batch(self, batch: Batch) -> np.ndarray:
        """float32 (P, D) stored embeddings of a batch's pixels, repeats averaged."""
        rows = len(batch.pixels) * batch.repeats
        with torch.inference_mode():
            output = self._outputs([getattr(batch, name) for name in _INPUTS], rows, batch.repeats)
            output = output.view(len(batch.pixels), batch.repeats, -1).mean(dim=1)
            return self.family.stored_embedding(output, self.arch).cpu().numpy()

    def _outputs(self, inputs: list[torch.Tensor], rows: int, repeats: int) -> torch.Tensor:
        """float32 (rows, out) model outputs of the first ``rows`` input rows, split after out-of-memory."""
        if self.max_rows is None or rows <= self.max_rows:
            try:
                return self._forward(inputs)[:rows]
            except torch.OutOfMemoryError:
                if rows <= repeats:
                    raise UserError(f"the {self.device} device ran out of memory for a single pixel of family "
                                    f"{self.family.name}: use a device with more memory") from None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.max_rows = max(repeats, rows // 2 // repeats * repeats)
                log.warning("out of memory on %s with %d rows per pass: continuing with %d", self.device, rows,
                            self.max_rows)
        parts = []
        for start in range(0, rows, self.max_rows):
            stop = min(rows, start + self.max_rows)
            parts.append(self._outputs(_padded([t[start:stop] for t in inputs]), stop - start, repeats))
        return torch.cat(parts)

    def _forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        inputs = [t.to(self.device, non_blocking=True) for t in inputs]
        if self.precision == "bf16":
            context = torch.autocast(self.device.type, dtype=torch.bfloat16)
        elif self.precision == "int8":
            context = _fastpath_disabled()
        else:
            context = contextlib.nullcontext()
        with context:
            return self.model.encode(*inputs).float()


def embed_arrays(
    model: nn.Module,
    arrays: Mapping[str, np.ndarray],
    *,
    valid: np.ndarray | None = None,
    data_kind: str = "mpc",
    origin: tuple[int, int] = (0, 0),
    progress: bool = False,
    **options,
) -> np.ndarray:
    """float32 (H, W, D) embeddings of one patch: :meth:`Embedder.embed` with a one-off Embedder.

    ``arrays`` holds the reference per-patch arrays (``bands`` ... ``sar_descending_doy``); ``model``
    comes from :func:`tessera.models.load_model`; ``options`` are :class:`InferOptions` fields.
    """
    embedder = Embedder(model, InferOptions(**options))
    return embedder.embed(arrays, valid=valid, data_kind=data_kind, origin=origin, progress=progress)


def check_preprocessing(family: Family, recorded: Mapping[str, str], *, allow_mismatch: bool, data: str) -> None:
    """Refuse data prepared otherwise than the family's checkpoints were trained on (S2 resampling,
    OPERA's layover pixels, the order of same-date granules; ``recorded`` as ``stack.Preprocessing``),
    unless ``allow_mismatch``. The S2 harmonisation rule is the kind of data (``data_kind_for``)."""
    from tessera.models import expected_preprocessing

    expected = expected_preprocessing(family.name)
    differing = [f"{key} {recorded.get(key)!r} (trained on {value!r})" for key, value in expected.items()
                 if recorded.get(key) != value]
    if not differing:
        return
    if not allow_mismatch:
        raise UserError(f"{data} was prepared otherwise than {family.name} checkpoints were trained on: "
                        f"{'; '.join(differing)}: fetch it again with fetch.s2_resampling: family and "
                        "fetch.s1_mask_layover: false, or allow it with --allow-preprocessing-mismatch "
                        "(model.allow_preprocessing_mismatch)")
    log.warning("%s: prepared otherwise than %s was trained on (allowed): %s", data, family.name, "; ".join(differing))


def data_kind_for(model: nn.Module, data_kind: str | None, *, allow_mismatch: bool = False, data: str) -> str:
    """The kind of ``data`` (``mpc`` or ``aws``, None: not known, as for a reference patch directory),
    checked against the kind the checkpoint was trained on; its normalisation table is the family's
    for that kind.

    v1.1 has one checkpoint per data source, each normalised with its own table; embedding data of
    the other kind gives embeddings that are off without any error, so a mismatch is refused
    unless ``allow_mismatch`` (then the data's table is used, as the reference would).
    """
    trained_on = getattr(model, "trained_on", None)
    if data_kind is None:
        return trained_on or "mpc"  # the reference's default
    if trained_on and trained_on != data_kind:
        if not allow_mismatch:
            raise UserError(f"{data} holds {data_kind}-kind data but the {model.family.name} checkpoint was trained "
                            f"on {trained_on} data: use the {data_kind} checkpoint, or allow it with "
                            "--allow-source-mismatch (model.allow_source_mismatch)")
        log.warning("%s: %s-kind data embedded with a checkpoint trained on %s data (allowed)", data, data_kind, trained_on)
    return data_kind
