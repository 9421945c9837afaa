"""Inference speed per model family at published size (seeded random weights), on this machine.

    .venv/bin/python benchmarks/infer.py [--families v1.0 v1.0-qat v1.1 v2 v2-large] [--device cpu]
        [--seconds 1.5] [--repeats 9] [--prep-size 256] [--no-precision] [--checkpoint FAMILY=PATH ...]

Random weights stand in for the published checkpoints (not available offline); ``--checkpoint``
measures a real one. Per family, at realistic sequence lengths (40 + 40 drawn steps for the
v1.0 families; 64 + 64 observations, i.e. the 64-step bin, for the bucketed ones), medians of
``--repeats`` runs:

- forward px/s: the model alone on prepared batches;
- end-to-end px/s: ``Embedder.embed`` on a patch (selection, normalisation, batching, forward,
  scattering into the patch) plus writing the patch's ``.npy``; e2e/fwd is the share of each
  end-to-end run spent in the forward pass (median), i.e. end-to-end over forward-only speed
  measured within the same run;
- preparation px/s per core: ``prepare_batches`` over a ``--prep-size`` square patch on one
  thread, per second of CPU time (other processes on the machine do not count against it);
- GMAC/s achieved: forward px/s × MACs per pixel (UPSTREAM.md §9 formula, printed), and its
  fraction of this machine's fp32 matmul rate (2048³, measured between the forward runs);
- with precision checks: bf16 autocast and int8 dynamic quantisation against fp32 on the same
  inputs: cosine similarity (minimum over pixels), the share of pixels whose RMS difference is
  below the RMS error of int8 storage (scale/√12, the bf16 criterion of ``tessera.infer``), and
  their end-to-end speed relative to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tessera.assemble import quantize
from tessera.models.engine import Embedder, cpu_threads, resolve_device
from tessera.options import InferOptions
from tessera.models import get_family, load_model

# name: (family, architecture overrides of the family's published default, steps per sensor)
MODELS = {
    "v1.0": ("v1.0", {}, 40),
    "v1.0-qat": ("v1.0-qat", {}, 40),
    "v1.1": ("v1.1", {}, 64),
    "v2": ("v2", {}, 64),  # the published "small" student
    "v2-large": ("v2", {"latent_dim": 160, "dim_feedforward": 2560}, 64),
}
S2_DATES, ASC_DATES, DESC_DATES = 73, 31, 30


def synthetic_patch(height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A year of S2 (73 dates) and S1 (31 + 30) with 57–64 valid observations per pixel and sensor,
    so that every pixel lands in the 64-step bin of the bucketed families."""
    rng = np.random.default_rng(seed)
    pixels = height * width

    def valid(steps: int) -> np.ndarray:
        counts = rng.integers(57, 65, pixels)
        ranks = np.argsort(rng.random((pixels, steps)), axis=1).argsort(axis=1)
        return np.ascontiguousarray((ranks < counts[:, None]).T).reshape(steps, height, width)

    arrays = {
        "bands": rng.integers(1, 10000, (S2_DATES, height, width, 10), dtype=np.uint16),
        "masks": valid(S2_DATES).astype(np.uint8),
        "doys": np.sort(rng.choice(np.arange(1, 366), S2_DATES, replace=False)).astype(np.uint16),
    }
    sar = rng.integers(1000, 9000, (ASC_DATES + DESC_DATES, height, width, 2)).astype(np.int16)
    sar[~valid(ASC_DATES + DESC_DATES)] = 0
    arrays["sar_ascending"], arrays["sar_descending"] = sar[:ASC_DATES].copy(), sar[ASC_DATES:].copy()
    for orbit, dates in (("ascending", ASC_DATES), ("descending", DESC_DATES)):
        arrays[f"sar_{orbit}_doy"] = np.sort(rng.choice(np.arange(1, 366), dates, replace=False)).astype(np.int16)
    return arrays


def macs_per_pixel(family: str, arch: dict, steps: int) -> float:
    """UPSTREAM.md §9: per backbone T·(b·D + D²) + L·T·(4D² + 2·D·F + 2·T·D) + pooling; + fusion head."""
    if family == "v1.1":
        d_model = 4 * arch["latent_dim"]
        layers, feed_forward = arch["s2_num_layers"], arch["s2_dim_feedforward"]
        head = 2 * d_model * 4 * d_model + 4 * d_model * arch["representation_dim"]
    elif family == "v2":
        d_model = 4 * arch["latent_dim"]
        layers, feed_forward = arch["num_layers"], arch["dim_feedforward"]
        head = 2 * d_model * 4 * d_model + 4 * d_model * arch["repr_dim"]
    else:
        d_model = 4 * arch["latent_dim"]
        layers, feed_forward = arch["num_layers"], arch["dim_feedforward"]
        head = 2 * d_model * arch["latent_dim"]
    pooling = steps * d_model + (steps * 6 * d_model**2 if family != "v2" else 0)
    total = head
    for bands in (10, 2):
        total += steps * (bands * d_model + d_model**2)
        total += layers * steps * (4 * d_model**2 + 2 * d_model * feed_forward + 2 * steps * d_model)
        total += pooling
    return float(total)


MATMUL_SIZE = 2048


def matmul(device: torch.device):
    """A function running one fp32 MATMUL_SIZE³ matmul on the device (to completion)."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)

    def run() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


class TimedEncode:
    """The model's ``encode``, adding up the seconds spent in it."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.seconds = model, 0.0

    def encode(self, *inputs: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        output = self.model.encode(*inputs)
        if output.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return output


def alternating(functions: list, repeats: int) -> list[list[float]]:
    """Seconds of each function, called in turn ``repeats`` times after one warm-up call each, so
    that all of them see the same load from other processes."""
    for function in functions:
        function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, record in zip(functions, times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return times


def timed(function, repeats: int, clock=time.perf_counter) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        times.append(clock() - start)
    return statistics.median(times)


def build(name: str, device: torch.device, checkpoint: str | None = None) -> torch.nn.Module:
    """The published architecture with seeded random weights, or a real checkpoint's model."""
    family_name, overrides, _ = MODELS[name]
    if checkpoint:
        return load_model(checkpoint, family_name, trust_checkpoint=True).to(device)
    family = get_family(family_name)
    torch.manual_seed(0)
    model = family.build(**{**family.default_arch(), **overrides}).eval().requires_grad_(False).to(device)
    model.family, model.arch = family, {**family.default_arch(), **overrides}
    return model


def forward_inputs(model, arrays: dict, pixels: int) -> list[torch.Tensor]:
    batch = next(model.family.prepare_batches(arrays, np.arange(pixels), data_kind="mpc", seed=0,
                                              batch_pixels=pixels))
    return [batch.s2_bands, batch.s2_doys, batch.s1_bands, batch.s1_doys]


def preparation_rate(model, arrays: dict, repeats: int) -> float:
    """Pixels per CPU second of ``prepare_batches`` on one thread."""
    pixels = arrays["bands"].shape[1] * arrays["bands"].shape[2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = timed(lambda: sum(len(b.pixels) for b in model.family.prepare_batches(
            arrays, np.arange(pixels), data_kind="mpc", seed=0, batch_pixels=4096)), repeats, time.process_time)
    finally:
        torch.set_num_threads(threads)
    return pixels / seconds


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def below_storage_error(exact: np.ndarray, other: np.ndarray, family: str) -> float:
    """Share of pixels whose RMS difference is below the RMS rounding error of int8 storage."""
    _, scales = quantize(exact, family)
    rms = np.sqrt(((other - exact) ** 2).mean(axis=-1))
    return float((rms < scales / np.sqrt(12)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=1.5, help="target duration of one forward measurement")
    parser.add_argument("--repeats", type=int, default=9, help="measurements per figure (other jobs make one noisy)")
    parser.add_argument("--prep-size", type=int, default=256, help="edge of the patch for the preparation rate")
    parser.add_argument("--no-precision", action="store_true", help="skip the bf16 / int8 comparisons")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="measure a real checkpoint instead of random weights, e.g. v1.1=tessera_v1_1_mpc_encoder.pt")
    args = parser.parse_args()
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    device = resolve_device(args.device)
    threads = cpu_threads()
    torch.set_num_threads(threads)
    reference_matmul = matmul(device)
    [matmul_times] = alternating([reference_matmul], args.repeats)
    print(f"device {device}, {threads} CPU threads, fp32 matmul {MATMUL_SIZE}^3: "
          f"{MATMUL_SIZE**3 / statistics.median(matmul_times) / 1e9:.1f} GMAC/s (median of {args.repeats})")
    print(f"{'model':9} {'steps':>6} {'GMAC/px':>8} {'fwd px/s':>9} {'e2e px/s':>9} {'e2e/fwd':>8} "
          f"{'prep px/s/core':>15} {'GMAC/s':>7} {'of mm':>6}")
    prep_arrays = synthetic_patch(args.prep_size, args.prep_size, seed=1)
    checks = []
    for name in args.families:
        family_name, _, steps = MODELS[name]
        model = build(name, device, checkpoints.get(name))
        macs = macs_per_pixel(family_name, model.arch, steps)
        # Size the measurement to about --seconds of forward passes, in whole 8-row blocks.
        probe_arrays = synthetic_patch(1, 8)
        probe = [t.to(device) for t in forward_inputs(model, probe_arrays, 8)]
        with torch.inference_mode():
            rate = 8 / timed(lambda: model.encode(*probe), 1)
        width = max(1, min(512, int(rate * args.seconds) // 8))
        arrays = synthetic_patch(8, width)
        pixels = 8 * width
        inputs = [t.to(device) for t in forward_inputs(model, arrays, pixels)]
        embedder = Embedder(model, InferOptions(device=str(device), precision="fp32", threads=threads, batch_pixels=4096))
        embedder.model = timed_model = TimedEncode(model)
        shares = []  # of each end-to-end run, the part spent in the forward pass

        def end_to_end_run() -> None:
            before, start = timed_model.seconds, time.perf_counter()
            np.save(out, embedder.embed(arrays, seed=1))
            shares.append((timed_model.seconds - before) / (time.perf_counter() - start))

        with tempfile.TemporaryDirectory() as scratch, torch.inference_mode():
            out = Path(scratch) / "patch.npy"
            forwards, end_to_ends, matmuls = alternating(
                [lambda: model.encode(*inputs), end_to_end_run, reference_matmul], args.repeats)
        forward = pixels / statistics.median(forwards)
        # Achieved MAC rate over the matmul rate measured between the same runs.
        of_matmul = statistics.median(pixels * macs / f / (MATMUL_SIZE**3 / m) for f, m in zip(forwards, matmuls))
        end_to_end = pixels / statistics.median(end_to_ends)
        # Unlike the ratio of two runs, the share within one run does not move with the load that
        # other processes put on the machine between runs.
        ratio = statistics.median(shares[1:])
        preparation = preparation_rate(model, prep_arrays, args.repeats)
        print(f"{name:9} {f'{steps}+{steps}':>6} {macs / 1e9:8.2f} {forward:9.1f} {end_to_end:9.1f} "
              f"{ratio:8.0%} {preparation:15,.0f} {forward * macs / 1e9:7.1f} {of_matmul:6.0%}")
        if not args.no_precision:
            exact = embedder.embed(arrays, seed=1).reshape(pixels, -1)
            for precision in ("bf16", "int8"):
                if precision == "int8" and device.type != "cpu":
                    continue
                other_embedder = Embedder(model, InferOptions(device=str(device), precision=precision, threads=threads))
                other = other_embedder.embed(arrays, seed=1).reshape(pixels, -1)
                fp32_times, other_times = alternating(
                    [lambda: embedder.embed(arrays, seed=1), lambda: other_embedder.embed(arrays, seed=1)],
                    max(3, args.repeats // 3))
                speedup = statistics.median(f / o for f, o in zip(fp32_times, other_times))
                checks.append((name, precision, cosine(exact, other).min(),
                               below_storage_error(exact, other, family_name), speedup))
        del model
    if checks:
        print(f"\n{'model':9} {'precision':>9} {'min cosine':>11} {'px under int8 error':>20} {'speed vs fp32':>14}")
        for name, precision, worst, share, speedup in checks:
            print(f"{name:9} {precision:>9} {worst:11.6f} {share:20.1%} {speedup:13.2f}x")


if __name__ == "__main__":
    main()
