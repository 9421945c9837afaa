"""Fetching one tile's Sentinel-2 and Sentinel-1 time series into its stacks, the reference's way.

Each scene is read window-only through a rasterio ``WarpedVRT`` onto the exact work-window grid
(tile CRS, window transform and size), so our data carry no sub-pixel shift (the reference's
stackstac snapping does, UPSTREAM.md §1.2). The encodings are the reference's (UPSTREAM.md §0–1):

* S2: SCL classes {0, 1, 2, 3, 8, 9} are invalid; same-day granules merge per pixel by the first
  granule (datetime order) that is valid there; reflectance is harmonised by the source's rule,
  NaN -> 0, then cast to uint16 by truncation. Where no granule is valid the mask is 0 and the
  values are the first granule's (the reference takes a random granule, unseeded; for a
  single-granule day both are the same).
* S1: code = trunc(clip((20·log10(γ0) + 50)·200, 0, 32767)) for finite γ0 > 0, else 0; a
  polarisation of an item covering less than the minimum is dropped; same-day same-orbit items
  merge "first non-zero wins" (datetime order).

Dates are processed in ascending order and appended to the stack as they come, so memory holds
one band of one scene plus the date being built. A scene that cannot be read (after GDAL's own
HTTP retries) is skipped and recorded in the stack's ``skipped``.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pystac
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from tqdm import tqdm

from tessera.errors import UserError
from tessera.grid import Tile
from tessera.sources import S1_POLARISATIONS, S2_BANDS, S2_SCL, Source, cached_search
from tessera.stack import MAX_CHUNK, S1_CHANNELS, StackGrid, chunk_edge, write_s1, write_s2

# GDAL over HTTP: no directory listing on open, only fetch what the window needs in as few requests
# as possible, time out instead of hanging (the reference's hung reads, UPSTREAM.md §10.2), and
# let GDAL retry transient HTTP errors (429, 5xx) itself.
GDAL_HTTP_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "2",
}

INVALID_SCL = (0, 1, 2, 3, 8, 9)  # no data, saturated/defective, dark area, cloud shadow, cloud medium/high
# The reference searches S2 with eo:cloud_cover < 100 (its S2_MAX_CLOUD default).
S2_MAX_CLOUD_PCT = 100.0
S1_CODE_MAX = 32767
ORBIT_STATES = ("ascending", "descending")
RESAMPLING = {"bilinear": Resampling.bilinear, "nearest": Resampling.nearest}


class SceneUnreadable(Exception):
    """One item could not be read; the fetch records it and goes on without it."""

    def __init__(self, item_id: str, reason: str):
        super().__init__(f"{item_id}: {reason}")
        self.item_id = item_id
        self.reason = reason


# --- encodings (exactly the reference's) ---------------------------------------------------------


def encode_s2(values: np.ndarray, acquired: dt.date, source: Source) -> np.ndarray:
    """Float reflectance DN (NaN = no data) -> the reference's uint16: harmonise, NaN -> 0, truncate."""
    harmonised = source.harmonise_s2(values, acquired)
    return np.nan_to_num(harmonised, nan=0.0).astype(np.uint16)


def encode_s1(gamma0: np.ndarray) -> np.ndarray:
    """Linear γ0 -> int16 code trunc(clip((20·log10 γ0 + 50)·200, 0, 32767)); non-finite or <= 0 -> 0.

    20·log10 of a power quantity is twice its dB value: the reference's encoding, kept because the
    checkpoints' normalisation was computed on it.
    """
    usable = np.isfinite(gamma0) & (gamma0 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        code = (20.0 * np.log10(np.where(usable, gamma0, 1.0)) + 50.0) * 200.0
    return np.where(usable, np.clip(code, 0, S1_CODE_MAX), 0).astype(np.int16)


def valid_scl(scl: np.ndarray) -> np.ndarray:
    """True where an SCL class is usable (4 vegetation, 5 bare, 6 water, 7 unclassified, 10 thin cirrus, 11 snow)."""
    return ~np.isin(scl, INVALID_SCL)


# --- window reads --------------------------------------------------------------------------------


class _WindowReader:
    """Reads one band of one item onto the work-window grid."""

    def __init__(self, tile: Tile, window: Window, source: Source):
        self.crs = f"EPSG:{tile.epsg}"
        self.transform = tile.window_transform(window)
        self.height, self.width = int(window.height), int(window.width)
        self.source = source

    def read(self, item: pystac.Item, band: str, resampling: Resampling) -> np.ndarray:
        """float64 (H, W), NaN where the scene has no data (outside its footprint or its nodata)."""
        try:
            href = self.source.href(item, band)
        except KeyError as exc:
            raise SceneUnreadable(item.id, str(exc.args[0])) from None
        try:
            with rasterio.open(href) as src, WarpedVRT(
                src,
                crs=self.crs,
                transform=self.transform,
                width=self.width,
                height=self.height,
                resampling=resampling,
                # Without a nodata value, an alpha band is what marks pixels outside the scene.
                add_alpha=src.nodata is None,
            ) as vrt:
                # The warp runs in the source's data type, as the reference's (stackstac) does: an
                # integer band is interpolated and rounded by GDAL before we see floats.
                data = vrt.read(1, masked=True)
        except RasterioError as exc:
            raise SceneUnreadable(item.id, f"{band}: {_one_line(exc)}") from None
        return data.astype(np.float64).filled(np.nan)


def _one_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = f"{exc} ({cause})" if cause is not None and "previous exception" in str(exc) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def window_bbox_lonlat(tile: Tile, window: Window) -> tuple[float, float, float, float]:
    """(west, south, east, north) in degrees of a work window (edges densified)."""
    left, top = tile.window_transform(window) @ (0, 0)
    right, bottom = tile.window_transform(window) @ (window.width, window.height)
    return transform_bounds(f"EPSG:{tile.epsg}", "EPSG:4326", left, bottom, right, top, densify_pts=21)


def _utc_date(item: pystac.Item) -> dt.date:
    when = item.datetime or item.common_metadata.start_datetime
    if when.tzinfo is None:
        return when.date()
    return when.astimezone(dt.timezone.utc).date()


def _in_datetime_order(items: Iterable[pystac.Item]) -> list[pystac.Item]:
    return sorted(items, key=lambda item: (item.datetime or item.common_metadata.start_datetime, item.id))


class _Coverage:
    """Percentage of ROI pixels (all window pixels without an ROI) that a boolean field covers."""

    def __init__(self, roi_mask: np.ndarray | None, shape: tuple[int, int]):
        if roi_mask is not None and roi_mask.shape != shape:
            raise ValueError(f"roi_mask has shape {roi_mask.shape}, the window is {shape}")
        self.roi = np.ones(shape, bool) if roi_mask is None else roi_mask.astype(bool)
        self.roi_pixels = int(self.roi.sum())
        if self.roi_pixels == 0:
            raise ValueError("roi_mask has no pixel inside the window")

    def pct(self, covered: np.ndarray) -> float:
        return 100.0 * int((covered & self.roi).sum()) / self.roi_pixels

    def enough(self, covered: np.ndarray, min_pct: float) -> bool:
        """The reference's rule (skip below the minimum) plus: a date with no valid pixel is never kept."""
        pct = self.pct(covered)
        return pct > 0 and pct >= min_pct


# --- the date loop -------------------------------------------------------------------------------


def _each_date(groups: dict, build: Callable, skipped: dict[str, str], desc: str):
    """Yield (key, result) per group in ascending key order; a scene that fails is recorded and the
    group is rebuilt without it (``build`` returns None for a group that is not kept)."""
    for key in tqdm(sorted(groups), desc=desc, unit="date", file=sys.stderr):
        items = groups[key]
        while items:
            try:
                result = build(key, items)
                break
            except SceneUnreadable as failure:
                skipped[failure.item_id] = failure.reason
                items = [item for item in items if item.id != failure.item_id]
        else:
            result = None
        if result is not None:
            yield key, result


def _too_few(tile: Tile, sensor: str, year: int, usable: int, min_scenes: int, skipped: dict[str, str], searched: int) -> UserError:
    if skipped:
        listed = "; ".join(f"{item_id}: {reason}" for item_id, reason in list(skipped.items())[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        failed = f"failed scenes: {listed}{more}"
    else:
        failed = f"no scene failed; {searched} scenes found, the rest had too little valid coverage"
    return UserError(
        f"tile {tile.name}: {usable} usable {sensor} dates in {year}, fewer than fetch.min_scenes={min_scenes} "
        f"({failed}): rerun if the source had trouble, else lower fetch.min_scenes or fetch.min_coverage_pct"
    )


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _grid(tile: Tile, window: Window, year: int, source: Source) -> StackGrid:
    return StackGrid(tile.name, year, window, f"EPSG:{tile.epsg}", tile.window_transform(window), source.name)


# --- Sentinel-2 ----------------------------------------------------------------------------------


def fetch_s2(
    tile: Tile,
    window: Window,
    year: int,
    source: Source,
    out: Path,
    *,
    roi_mask: np.ndarray | None = None,
    min_coverage_pct: float = 0.01,
    min_scenes: int = 1,
    resampling: str = "bilinear",
    search_cache: Path | None = None,
    patch_size: int = MAX_CHUNK,
) -> dict:
    """Build ``out`` (s2.zarr) for a work window of a tile; returns a small report.

    ``roi_mask`` (H, W) marks the ROI pixels coverage is measured on (default: the whole window).
    Raises UserError naming the tile and the failed scenes if fewer than ``min_scenes`` dates are usable.
    """
    reader = _WindowReader(tile, window, source)
    coverage = _Coverage(roi_mask, (reader.height, reader.width))
    band_resampling = RESAMPLING[resampling]
    found = cached_search(source, source.s2_collection, window_bbox_lonlat(tile, window), year, search_cache)
    items = [item for item in found if item.properties.get("eo:cloud_cover", 0.0) < S2_MAX_CLOUD_PCT]
    groups = defaultdict(list)
    for item in items:
        groups[_utc_date(item)].append(item)
    low_coverage: list[str] = []

    def build(date: dt.date, day_items: list[pystac.Item]):
        day_items = _in_datetime_order(day_items)
        # Which granule each pixel takes: the first (datetime order) whose SCL is valid there.
        chosen = np.full((reader.height, reader.width), -1, np.int32)
        for index, item in enumerate(day_items):
            scl = np.nan_to_num(reader.read(item, S2_SCL, Resampling.nearest), nan=0.0)
            chosen[(chosen < 0) & valid_scl(scl)] = index
        valid = chosen >= 0
        if not coverage.enough(valid, min_coverage_pct):
            low_coverage.append(date.isoformat())
            return None
        value_from = np.where(valid, chosen, 0)
        bands = np.empty((reader.height, reader.width, len(S2_BANDS)), np.uint16)
        for channel, band in enumerate(S2_BANDS):
            values = np.full((reader.height, reader.width), np.nan)
            for index in np.unique(value_from):
                take = value_from == index
                values[take] = reader.read(day_items[index], band, band_resampling)[take]
            bands[..., channel] = encode_s2(values, date, source)
        return [item.id for item in day_items], bands, valid.astype(np.uint8)

    kept: list[str] = []
    with rasterio.Env(**GDAL_HTTP_OPTIONS), write_s2(out, _grid(tile, window, year, source), chunk=chunk_edge(patch_size)) as stack:
        for date, (scene_ids, bands, mask) in _each_date(groups, build, stack.skipped, f"{tile.name} S2"):
            stack.append(date, scene_ids, bands, mask)
            kept.append(date.isoformat())
        if len(stack) < min_scenes:
            raise _too_few(tile, "Sentinel-2", year, len(stack), min_scenes, stack.skipped, len(items))
        skipped = dict(stack.skipped)
    return _report(tile, "s2", out, found=len(found), kept=kept, low_coverage=low_coverage, skipped=skipped,
                   excluded_full_cloud=len(found) - len(items))


def _report(tile: Tile, sensor: str, out: Path, **facts) -> dict:
    return {"tile": tile.name, "sensor": sensor, **facts, "bytes": _store_bytes(out)}


# --- Sentinel-1 ----------------------------------------------------------------------------------


def fetch_s1(
    tile: Tile,
    window: Window,
    year: int,
    source: Source,
    out: Path,
    *,
    roi_mask: np.ndarray | None = None,
    min_coverage_pct: float = 0.01,
    min_scenes: int = 1,
    resampling: str = "bilinear",
    search_cache: Path | None = None,
    patch_size: int = MAX_CHUNK,
) -> dict:
    """Build ``out`` (s1.zarr) for a work window of a tile; returns a small report.

    Items are grouped by UTC date and ``sat:orbit_state``; items without an orbit state are skipped
    and recorded. Otherwise as ``fetch_s2``.
    """
    reader = _WindowReader(tile, window, source)
    coverage = _Coverage(roi_mask, (reader.height, reader.width))
    gamma0_resampling = RESAMPLING[resampling]
    found = cached_search(source, source.s1_collection, window_bbox_lonlat(tile, window), year, search_cache)
    groups = defaultdict(list)
    no_orbit = {}
    for item in found:
        orbit = str(item.properties.get("sat:orbit_state", "")).lower()
        if orbit in ORBIT_STATES:
            groups[(_utc_date(item), orbit)].append(item)
        else:
            no_orbit[item.id] = f"sat:orbit_state is {item.properties.get('sat:orbit_state')!r}, not ascending/descending"
    low_coverage: list[str] = []

    def build(key: tuple[dt.date, str], group_items: list[pystac.Item]):
        merged = np.zeros((reader.height, reader.width, S1_CHANNELS), np.int16)
        used = []
        for item in _in_datetime_order(group_items):
            contributed = False
            for channel, polarisation in enumerate(S1_POLARISATIONS):
                gamma0 = reader.read(item, polarisation, gamma0_resampling)
                # The reference drops a polarisation of an item that covers too little of the ROI.
                if coverage.pct(np.isfinite(gamma0) & (gamma0 > 0)) < min_coverage_pct:
                    continue
                code = encode_s1(gamma0)
                empty = merged[..., channel] == 0
                merged[..., channel][empty] = code[empty]
                contributed = True
            if contributed:
                used.append(item.id)
        if not used or not coverage.enough((merged != 0).any(axis=-1), min_coverage_pct):
            low_coverage.append(f"{key[0].isoformat()} {key[1]}")
            return None
        return used, merged

    kept: list[str] = []
    with rasterio.Env(**GDAL_HTTP_OPTIONS), write_s1(out, _grid(tile, window, year, source), chunk=chunk_edge(patch_size)) as stack:
        stack.skipped.update(no_orbit)
        for (date, orbit), (scene_ids, sar) in _each_date(groups, build, stack.skipped, f"{tile.name} S1"):
            stack.append(orbit, date, scene_ids, sar)
            kept.append(f"{date.isoformat()} {orbit}")
        if len(stack) < min_scenes:
            raise _too_few(tile, "Sentinel-1", year, len(stack), min_scenes, stack.skipped, len(found))
        skipped = dict(stack.skipped)
    return _report(tile, "s1", out, found=len(found), kept=kept, low_coverage=low_coverage, skipped=skipped)
