"""The per-tile stacks: the Zarr v3 format (docs/INTERNALS.md "Stack format"), writing, reading, the index.

``s2.zarr`` holds S2 ``bands``/``masks``/``doys``; ``s1.zarr`` holds ``sar``/``doys`` in sub-groups
``ascending`` and ``descending``. Both cover the tile's work window only, grow one time step at a
time while a fetch runs, and appear at their final path only once complete (built in a temporary
sibling, ``complete: true`` set last, then renamed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from affine import Affine
from rasterio.windows import Window
from zarr.codecs import BloscCodec, Crc32cCodec

from tessera.errors import DamagedIntermediate, UserError
from tessera.io import atomic_path
from tessera.period import ALL_ORBITS, S1_ORBIT_DIRECTIONS, WHOLE_YEAR

S2_CHANNELS = 10
S1_CHANNELS = 2  # VV, VH
S1_ORBITS = S1_ORBIT_DIRECTIONS  # the S1 store's groups, one per direction
MAX_CHUNK = 512
# Blosc's byte shuffle (the high and low bytes of the values apart) before zstd level 3. Measured
# on a whole tile's stacks, a year of demo scenes (benchmarks/stack_codecs.py, README "One tile,
# stage by stage"): 0.79x the bytes of plain zstd 3 (0.61x the raw arrays), for 1.18x its writing
# CPU and 0.94x its reading CPU at inference. zstd 4-5 after the shuffle is 6 % smaller still but
# writes at 1.8-2.4x (the fetch's CPU); bit shuffle, channel-first chunks and 256 or 1024 px chunks
# are no smaller. Blosc has no checksum: the CRC-32C after it makes every chunk self-verifying, so a
# corrupted chunk fails to decode instead of being read as data.
_COMPRESSORS = (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec())
_DOY_CHUNK = 512
INDEX_FORMAT = 1

# What each series holds: array name -> (dtype, channels or None); doys dtype. The dtypes are the
# reference's (UPSTREAM.md §2), so that exporting to its .npy layout is a plain copy.
_S2_ARRAYS = {"bands": ("uint16", S2_CHANNELS), "masks": ("uint8", None)}
_S2_DOY_DTYPE = "uint16"
_S1_ARRAYS = {"sar": ("int16", S1_CHANNELS)}
_S1_DOY_DTYPE = "int16"



@dataclass(frozen=True)
class Preprocessing:
    """The choices of a fetch that change the numbers, recorded in both stores and ``stack.json``
    (``tessera.models.expected_preprocessing`` says what each family was trained on)."""

    s2_resampling: str  # bilinear or nearest (SCL: always nearest)
    harmonisation: str  # the source's S2 baseline rule: mpc or none
    s1_layover: str  # OPERA's layover/shadow pixels: kept (the reference) or masked
    granule_order: str  # the order in which same-date granules are merged (first valid wins)
    # Which scenes the time series takes (config period, fetch.s1_orbit_state); the defaults are what
    # stacks written before these were recorded hold.
    period: str = str(WHOLE_YEAR)  # MM-DD/MM-DD of the stack's year, both included
    s1_orbit_state: str = ALL_ORBITS  # both, ascending or descending

    def attrs(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_attrs(cls, attrs: Mapping, where: Path) -> Preprocessing:
        """The choices recorded in a store or an index (``where``); a record that does not hold them is
        refused in one line."""
        try:
            return cls(**(attrs or {}))
        except TypeError:
            raise UserError(f"{where} records preprocessing {dict(attrs or {})!r}, not the choices this version records "
                            f"({', '.join(cls.__dataclass_fields__)}): it is damaged or from another version; "
                            "delete it and rerun the fetch of this tile") from None

    @classmethod
    def expected_by(cls, family: str, harmonisation: str) -> Preprocessing:
        """What a family's checkpoints were trained on, for data of a source with this rule."""
        from tessera.models import expected_preprocessing

        return cls(harmonisation=harmonisation, **expected_preprocessing(family))


@dataclass(frozen=True)
class StackGrid:
    """Where a stack lives: the tile, the year, its work window and that window's georeferencing."""

    tile: str
    year: int
    window: Window  # in tile pixel coordinates
    crs: str  # "EPSG:326zz"
    transform: Affine  # of the window
    source: str
    data_kind: str  # mpc or aws: picks a family's normalisation table where it has one per kind (Source.data_kind)
    preprocessing: Preprocessing

    def attrs(self) -> dict:
        return {
            "tile": self.tile,
            "year": self.year,
            "window": [int(self.window.col_off), int(self.window.row_off), int(self.window.width), int(self.window.height)],
            "crs": self.crs,
            "transform": list(self.transform)[:6],
            "source": self.source,
            "data_kind": self.data_kind,
            "preprocessing": self.preprocessing.attrs(),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping, store: Path) -> StackGrid:
        missing = [key for key in ("tile", "year", "window", "crs", "transform", "source", "data_kind", "preprocessing")
                   if key not in attrs]
        if missing:
            raise UserError(f"stack {store} lacks {', '.join(missing)} (written by an older tessera-workflow?): "
                            "delete it and rerun the fetch of this tile")
        return cls(attrs["tile"], attrs["year"], Window(*attrs["window"]), attrs["crs"], Affine(*attrs["transform"]),
                   attrs["source"], attrs["data_kind"], Preprocessing.from_attrs(attrs["preprocessing"], store))


def chunk_edge(patch_size: int) -> int:
    """Spatial chunk edge of the stores: one patch reads few chunks, and chunks stay small."""
    return min(patch_size, MAX_CHUNK)


# --- writing -----------------------------------------------------------------------------------


class _SeriesWriter:
    """Arrays of one zarr group that grow along time, with their dates, day-of-year and scene ids."""

    def __init__(self, group: zarr.Group, arrays: dict, doy_dtype: str, height: int, width: int, chunk: int):
        self._group = group
        self._arrays = {}
        for name, (dtype, channels) in arrays.items():
            shape, chunks = (0, height, width), (1, chunk, chunk)
            if channels:
                shape, chunks = (*shape, channels), (*chunks, channels)
            # Every chunk is written, empty or not: checking each for emptiness cost the fetch more
            # CPU (6 % of it, py-spy) than storing the rare empty ones (a few bytes each) does.
            self._arrays[name] = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=_COMPRESSORS,
                                                    fill_value=0, config={"write_empty_chunks": True})
        self._doys = group.create_array("doys", shape=(0,), chunks=(_DOY_CHUNK,), dtype=doy_dtype, fill_value=0)
        self.dates: list[str] = []
        self.scenes: list[list[str]] = []
        group.attrs.update({"dates": [], "scenes": []})

    def append(self, date: dt.date, scenes: list[str], data: dict[str, np.ndarray]) -> None:
        if self.dates and date.isoformat() <= self.dates[-1]:
            raise ValueError(f"time steps must be appended in ascending date order: {date} after {self.dates[-1]}")
        for name, array in self._arrays.items():
            step = data[name]
            if step.shape != array.shape[1:] or step.dtype != array.dtype:
                raise ValueError(f"{name}: expected {array.dtype} {array.shape[1:]}, got {step.dtype} {step.shape}")
            array.append(step[np.newaxis], axis=0)
        self._doys.append(np.array([date.timetuple().tm_yday], dtype=self._doys.dtype), axis=0)
        self.dates.append(date.isoformat())
        self.scenes.append(list(scenes))
        self._group.attrs.update({"dates": self.dates, "scenes": self.scenes})

    def __len__(self) -> int:
        return len(self.dates)


class S2StackWriter:
    """Appends S2 time steps; created by ``write_s2``."""

    def __init__(self, group: zarr.Group, grid: StackGrid, chunk: int):
        self.skipped: dict[str, str] = {}
        self._series = _SeriesWriter(group, _S2_ARRAYS, _S2_DOY_DTYPE, int(grid.window.height), int(grid.window.width), chunk)

    def append(self, date: dt.date, scenes: list[str], bands: np.ndarray, mask: np.ndarray) -> None:
        """One date: ``bands`` uint16 (H, W, 10) in S2_BANDS order, ``mask`` uint8 (H, W), 1 = valid."""
        self._series.append(date, scenes, {"bands": bands, "masks": mask})

    def __len__(self) -> int:
        return len(self._series)


class S1StackWriter:
    """Appends S1 time steps per orbit direction; created by ``write_s1``."""

    def __init__(self, group: zarr.Group, grid: StackGrid, chunk: int):
        self.skipped: dict[str, str] = {}
        height, width = int(grid.window.height), int(grid.window.width)
        self._orbits = {
            orbit: _SeriesWriter(group.create_group(orbit), _S1_ARRAYS, _S1_DOY_DTYPE, height, width, chunk)
            for orbit in S1_ORBITS
        }

    def append(self, orbit: str, date: dt.date, scenes: list[str], sar: np.ndarray) -> None:
        """One date of one orbit direction: ``sar`` int16 (H, W, 2) [VV, VH] codes, 0 = missing."""
        self._orbits[orbit].append(date, scenes, {"sar": sar})

    def __len__(self) -> int:
        return sum(len(series) for series in self._orbits.values())


@contextlib.contextmanager
def _write_store(path: Path, grid: StackGrid, writer_class, chunk: int):
    with atomic_path(path, directory=True) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.attrs.update({**grid.attrs(), "skipped": {}, "complete": False})
        writer = writer_class(group, grid, chunk)
        yield writer
        group.attrs.update({"skipped": writer.skipped})
        group.attrs.update({"complete": True})  # last: a store without it was never finished


def write_s2(path: str | os.PathLike, grid: StackGrid, *, chunk: int = MAX_CHUNK) -> contextlib.AbstractContextManager[S2StackWriter]:
    """Context manager building ``s2.zarr``; the store appears at ``path`` only if the block succeeds."""
    return _write_store(Path(path), grid, S2StackWriter, chunk)


def write_s1(path: str | os.PathLike, grid: StackGrid, *, chunk: int = MAX_CHUNK) -> contextlib.AbstractContextManager[S1StackWriter]:
    """Context manager building ``s1.zarr``; the store appears at ``path`` only if the block succeeds."""
    return _write_store(Path(path), grid, S1StackWriter, chunk)


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeSeries:
    """One time axis of a stack: its arrays (zarr, read lazily), day-of-year, dates and scene ids."""

    arrays: Mapping[str, zarr.Array]
    doys: np.ndarray
    dates: tuple[str, ...]
    scenes: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.dates)


@dataclass(frozen=True)
class S2Stack:
    path: Path
    grid: StackGrid
    skipped: Mapping[str, str]
    series: TimeSeries

    @property
    def bands(self) -> zarr.Array:
        return self.series.arrays["bands"]

    @property
    def masks(self) -> zarr.Array:
        return self.series.arrays["masks"]


@dataclass(frozen=True)
class S1Stack:
    path: Path
    grid: StackGrid
    skipped: Mapping[str, str]
    ascending: TimeSeries
    descending: TimeSeries

    def orbit(self, name: str) -> TimeSeries:
        return {"ascending": self.ascending, "descending": self.descending}[name]


def _open_complete(path: Path, kind: str) -> zarr.Group:
    if not path.exists():
        raise UserError(f"{kind} stack {path} does not exist: run the fetch step for this tile first")
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UserError(f"{kind} stack {path} is not a readable Zarr v3 store ({exc}): delete it and rerun the fetch step") from None
    if group.attrs.get("complete") is not True:
        raise UserError(f"{kind} stack {path} is incomplete (its fetch did not finish): delete it and rerun the fetch step")
    return group


def _read_series(group: zarr.Group, names) -> TimeSeries:
    return TimeSeries(
        arrays={name: group[name] for name in names},
        doys=group["doys"][:],
        dates=tuple(group.attrs["dates"]),
        scenes=tuple(tuple(ids) for ids in group.attrs["scenes"]),
    )


def open_s2(path: str | os.PathLike) -> S2Stack:
    """Open a complete ``s2.zarr``; UserError if it is missing or incomplete."""
    path = Path(path)
    group = _open_complete(path, "S2")
    attrs = group.attrs.asdict()
    return S2Stack(path, StackGrid.from_attrs(attrs, path), attrs["skipped"], _read_series(group, _S2_ARRAYS))


def open_s1(path: str | os.PathLike) -> S1Stack:
    """Open a complete ``s1.zarr``; UserError if it is missing or incomplete."""
    path = Path(path)
    group = _open_complete(path, "S1")
    attrs = group.attrs.asdict()
    orbits = {orbit: _read_series(group[orbit], _S1_ARRAYS) for orbit in S1_ORBITS}
    return S1Stack(path, StackGrid.from_attrs(attrs, path), attrs["skipped"], **orbits)


def _read_boundless(array: zarr.Array, window: Window) -> np.ndarray:
    """array[:, rows, cols, ...] for a window that may reach outside the stack; outside reads as 0."""
    height, width = array.shape[1], array.shape[2]
    row0, col0 = int(window.row_off), int(window.col_off)
    out = np.zeros((array.shape[0], int(window.height), int(window.width), *array.shape[3:]), dtype=array.dtype)
    r_start, r_stop = max(row0, 0), min(row0 + int(window.height), height)
    c_start, c_stop = max(col0, 0), min(col0 + int(window.width), width)
    if r_start < r_stop and c_start < c_stop:
        out[:, r_start - row0:r_stop - row0, c_start - col0:c_stop - col0] = array[:, r_start:r_stop, c_start:c_stop]
    return out


def read_window(s2_path: str | os.PathLike, s1_path: str | os.PathLike, window: Window) -> dict[str, np.ndarray]:
    """A window of both stacks in the reference per-patch layout (keys as ``layout.REFERENCE_ARRAYS``).

    ``window`` is in work-window pixel coordinates (0, 0 = the stacks' top-left pixel). Parts of
    the window outside the stacks read as 0 (missing), as the reference pads edge patches.
    """
    s2, s1 = open_s2(s2_path), open_s1(s1_path)
    arrays = {
        "bands": _read_checked(s2.bands, window, s2_path),
        "masks": _read_checked(s2.masks, window, s2_path),
        "doys": s2.series.doys,
    }
    for orbit in S1_ORBITS:
        series = s1.orbit(orbit)
        arrays[f"sar_{orbit}"] = _read_checked(series.arrays["sar"], window, s1_path)
        arrays[f"sar_{orbit}_doy"] = series.doys
    return arrays


def _read_checked(array: zarr.Array, window: Window, store: str | os.PathLike) -> np.ndarray:
    """A window read; a chunk that fails to decode (CRC-32C, truncation) is named as damage."""
    try:
        return _read_boundless(array, window)
    except (RuntimeError, ValueError) as error:
        raise DamagedIntermediate(store, f"a chunk of {array.basename!r}: {error}") from None


# --- the stack stage: index and verification ---------------------------------------------------


def _array_digest(array: zarr.Array | np.ndarray) -> str:
    """sha256 of dtype, shape and C-order content, read one time step at a time (bounded memory)."""
    digest = hashlib.sha256(f"{np.dtype(array.dtype).str}{tuple(array.shape)}".encode())
    if array.ndim == 1:
        digest.update(np.ascontiguousarray(array[:]).tobytes())
    else:
        for step in range(array.shape[0]):
            digest.update(np.ascontiguousarray(array[step]).tobytes())
    return digest.hexdigest()


def _describe_series(series: TimeSeries, checksums: bool) -> dict:
    def describe(array) -> dict:
        facts = {"shape": list(array.shape), "dtype": np.dtype(array.dtype).name}
        if checksums:
            facts["sha256"] = _array_digest(array)
        return facts

    return {
        "dates": list(series.dates),
        "doys": series.doys.tolist(),
        "scenes": [list(ids) for ids in series.scenes],
        "arrays": {name: describe(array) for name, array in {**series.arrays, "doys": series.doys}.items()},
    }


def _describe(s2: S2Stack, s1: S1Stack, checksums: bool = True) -> dict:
    if s2.grid != s1.grid:
        raise UserError(
            f"the S2 stack {s2.path} and S1 stack {s1.path} disagree on tile, year, window, CRS, transform, source or "
            "preprocessing "
            f"({s2.grid} vs {s1.grid}): delete both and rerun the fetch of this tile"
        )
    return {
        "format": INDEX_FORMAT,
        **s2.grid.attrs(),
        "s2": {"skipped": dict(s2.skipped), **_describe_series(s2.series, checksums)},
        "s1": {"skipped": dict(s1.skipped), **{orbit: _describe_series(s1.orbit(orbit), checksums) for orbit in S1_ORBITS}},
    }


def write_stack_index(s2_path: str | os.PathLike, s1_path: str | os.PathLike, out_json: str | os.PathLike) -> dict:
    """The ``stack`` stage: check both stores are complete and on the same grid, write ``stack.json``.

    The index records the time axes, scene ids, shapes and a checksum of every array; store paths
    are kept relative to the index so that a work directory can be moved.
    """
    out_json = Path(out_json)
    index = _describe(open_s2(s2_path), open_s1(s1_path))
    index["stores"] = {
        "s2": os.path.relpath(Path(s2_path).absolute(), out_json.parent.absolute()),
        "s1": os.path.relpath(Path(s1_path).absolute(), out_json.parent.absolute()),
    }
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return index


@dataclass(frozen=True)
class VerifiedStack:
    """A stack index whose stores still match it."""

    index: dict
    s2_path: Path
    s1_path: Path


def _without_checksums(node):
    if isinstance(node, dict):
        return {key: _without_checksums(value) for key, value in node.items() if key != "sha256"}
    return node


def verify_stack_index(index_json: str | os.PathLike, *, checksums: bool = True) -> VerifiedStack:
    """Check that the stores named by ``stack.json`` still hold exactly what it records.

    With ``checksums`` every array is re-read and hashed; without, only the stores' structure (time
    axes, scene ids, shapes, completeness) is compared, which is instant — chunk contents are still
    protected by their per-chunk CRC-32C when they are read.
    """
    index_json = Path(index_json)
    if not index_json.exists():
        raise UserError(f"stack index {index_json} does not exist: run the fetch of this tile first")
    index = json.loads(index_json.read_text())
    s2_path = index_json.parent / index["stores"]["s2"]
    s1_path = index_json.parent / index["stores"]["s1"]
    current = _describe(open_s2(s2_path), open_s1(s1_path), checksums)
    recorded = {key: value for key, value in index.items() if key != "stores"}
    # An index written before a choice was recorded holds that choice's default (as the stores read back).
    recorded["preprocessing"] = Preprocessing.from_attrs(recorded.get("preprocessing", {}), index_json).attrs()
    if not checksums:
        recorded = _without_checksums(recorded)
    if current != recorded:
        differing = sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))
        raise UserError(
            f"stack index {index_json} no longer matches its stores (differs in {', '.join(differing)}): rerun the fetch of this tile"
        )
    return VerifiedStack(index, s2_path, s1_path)
