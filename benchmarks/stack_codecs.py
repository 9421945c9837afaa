"""Zarr codecs, filters and chunk shapes for the stacks, measured on a fetched tile: size, write and read CPU.

    .venv/bin/python benchmarks/stack_codecs.py WORK_TILE [--every 3] [--repeats 3] [--scratch DIR]

WORK_TILE is a tile-year's work folder (``<work_dir>/<year>/<tile>``, with ``s2.zarr`` and ``s1.zarr``),
e.g. one that ``benchmarks/fulltile.py --keep`` left. Every candidate stores the same arrays (S2
``bands`` and ``masks``, S1 ``sar`` of both orbits; every ``--every``-th time step) as the fetch does:
arrays created empty, one time step appended at a time. Per candidate: bytes on disk; write CPU (the
appends); read CPU as inference reads (every 512 px patch window, all time steps, of every array).
Turns alternate between candidates; times are medians of ``--repeats``, each also as a ratio to the
baseline's (zstd 3, what the stacks used before) in the same turn. Then the chosen encoding (stack.py's) stores every time step, and its bytes
are compared with the reference's raw ``.npy`` files for the same tile (``data_processed/``:
bands, masks, doys, sar_<orbit>, sar_<orbit>_doy; UPSTREAM.md §2).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from tessera import stack

NPY_HEADER_BYTES = 128  # the reference's .npy headers (v1.0, padded to a multiple of 16 below 128 bytes)
PATCH = 512


@dataclass(frozen=True)
class Candidate:
    name: str
    compressors: tuple  # bytes -> bytes codecs
    channels_first: bool = False  # a transpose filter storing each channel's plane contiguously in a chunk
    chunk: int = stack.MAX_CHUNK
    config: dict = field(default_factory=lambda: {"write_empty_chunks": True})

    def create(self, group: zarr.Group, name: str, step_shape: tuple, dtype) -> zarr.Array:
        chunks = (1, *(min(self.chunk, edge) for edge in step_shape[:2]), *step_shape[2:])
        filters = [TransposeCodec(order=(0, 3, 1, 2))] if self.channels_first and len(step_shape) == 3 else []
        return group.create_array(name, shape=(0, *step_shape), chunks=chunks, dtype=dtype, filters=filters,
                                  serializer=BytesCodec(), compressors=list(self.compressors), fill_value=0,
                                  config=self.config)


def blosc(level: int, shuffle: str) -> tuple:
    """zstd inside Blosc after its byte or bit shuffle; Blosc has no checksum, so crc32c after it."""
    return (BloscCodec(cname="zstd", clevel=level, shuffle=shuffle), Crc32cCodec())


BASELINE = "zstd 3"  # what the stacks used before
CHOSEN = "blosc-zstd 3 byte shuffle"  # what stack.py uses
CANDIDATES = [
    Candidate(BASELINE, (ZstdCodec(level=3, checksum=True),)),
    Candidate("zstd 1", (ZstdCodec(level=1, checksum=True),)),
    Candidate("zstd 9", (ZstdCodec(level=9, checksum=True),)),
    Candidate("zstd 3, channels first", (ZstdCodec(level=3, checksum=True),), channels_first=True),
    Candidate("blosc-zstd 1 byte shuffle", blosc(1, "shuffle")),
    Candidate("blosc-zstd 3 byte shuffle", blosc(3, "shuffle")),
    Candidate("blosc-zstd 4 byte shuffle", blosc(4, "shuffle")),
    Candidate("blosc-zstd 5 byte shuffle", blosc(5, "shuffle")),
    Candidate("blosc-zstd 3 bit shuffle", blosc(3, "bitshuffle")),
    Candidate("blosc-zstd 3 byte shuffle, channels first", blosc(3, "shuffle"), channels_first=True),
    Candidate("blosc-zstd 3 byte shuffle, chunks 256", blosc(3, "shuffle"), chunk=256),
    Candidate("blosc-zstd 3 byte shuffle, chunks 1024", blosc(3, "shuffle"), chunk=1024),
]


def load(work_tile: Path, every: int) -> dict[str, np.ndarray]:
    s2, s1 = stack.open_s2(work_tile / "s2.zarr"), stack.open_s1(work_tile / "s1.zarr")
    arrays = {"bands": s2.bands[::every], "masks": s2.masks[::every]}
    for orbit in stack.S1_ORBITS:
        arrays[f"sar_{orbit}"] = s1.orbit(orbit).arrays["sar"][::every]
    return arrays


def write(candidate: Candidate, arrays: dict[str, np.ndarray], where: Path) -> float:
    """CPU seconds to build the store as the fetch does: one time step appended at a time."""
    start = time.process_time()
    group = zarr.open_group(where, mode="w", zarr_format=3)
    for name, values in arrays.items():
        array = candidate.create(group, name, values.shape[1:], values.dtype)
        for step in values:
            array.append(step[np.newaxis], axis=0)
    return time.process_time() - start


def read(where: Path, arrays: dict[str, np.ndarray]) -> float:
    """CPU seconds to read every patch window, all time steps, of every array (what inference reads)."""
    start = time.process_time()
    group = zarr.open_group(where, mode="r")
    for name, values in arrays.items():
        array, (height, width) = group[name], values.shape[1:3]
        for row in range(0, height, PATCH):
            for col in range(0, width, PATCH):
                array[:, row:row + PATCH, col:col + PATCH]
    return time.process_time() - start


def store_bytes(where: Path) -> int:
    return sum(f.stat().st_size for f in where.rglob("*") if f.is_file())


def reference_npy_bytes(arrays: dict[str, np.ndarray]) -> int:
    """The reference's data_processed/*.npy for the same arrays: raw bytes plus headers and the doys."""
    steps = {"doys": arrays["bands"].shape[0], **{f"sar_{o}_doy": arrays[f"sar_{o}"].shape[0] for o in stack.S1_ORBITS}}
    return (sum(a.nbytes for a in arrays.values()) + 2 * sum(steps.values())
            + NPY_HEADER_BYTES * (len(arrays) + len(steps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_tile", type=Path)
    parser.add_argument("--every", type=int, default=3, help="keep every n-th time step for the comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--choose", default=CHOSEN, help="candidate to store in full (default: stack.py's)")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="stack-codecs-", dir=args.scratch))
    arrays = load(args.work_tile, args.every)
    raw = sum(a.nbytes for a in arrays.values())
    print(f"{args.work_tile}: every {args.every}. time step: " + ", ".join(f"{n} {a.shape} {a.dtype}" for n, a in arrays.items())
          + f"; {raw / 2**20:.0f} MiB raw")
    sizes, writes, reads = {}, {c.name: [] for c in CANDIDATES}, {c.name: [] for c in CANDIDATES}
    for turn in range(args.repeats):
        for candidate in CANDIDATES:
            where = scratch / f"turn{turn}.zarr"
            writes[candidate.name].append(write(candidate, arrays, where))
            reads[candidate.name].append(read(where, arrays))
            sizes[candidate.name] = store_bytes(where)
            shutil.rmtree(where)
    # Ratios to the baseline within each turn (the machine's load changes between turns).
    print(f"\n{'candidate':<44} {'MiB':>8} {'x raw':>6} {'x zstd 3':>9} {'write s':>8} {'x zstd 3':>9} "
          f"{'read s':>7} {'x zstd 3':>9}")
    for candidate in CANDIDATES:
        name = candidate.name
        write_ratio = statistics.median(w / c for w, c in zip(writes[name], writes[BASELINE]))
        read_ratio = statistics.median(r / c for r, c in zip(reads[name], reads[BASELINE]))
        print(f"{name:<44} {sizes[name] / 2**20:8.1f} {sizes[name] / raw:6.3f} {sizes[name] / sizes[BASELINE]:9.3f} "
              f"{statistics.median(writes[name]):8.2f} {write_ratio:9.2f} {statistics.median(reads[name]):7.2f} "
              f"{read_ratio:9.2f}")

    chosen = next(c for c in CANDIDATES if c.name == args.choose)
    full = load(args.work_tile, 1)
    where = scratch / "chosen.zarr"
    write(chosen, full, where)
    chosen_bytes, current_bytes = store_bytes(where), store_bytes(args.work_tile / "s2.zarr") + store_bytes(args.work_tile / "s1.zarr")
    reference = reference_npy_bytes(full)
    print(f"\nevery time step: reference data_processed/*.npy {reference / 2**20:.1f} MiB; stacks as fetched "
          f"(s2.zarr + s1.zarr) {current_bytes / 2**20:.1f} MiB = {current_bytes / reference:.3f}x; "
          f"{chosen.name!r} {chosen_bytes / 2**20:.1f} MiB = {chosen_bytes / reference:.3f}x")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
