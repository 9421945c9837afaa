"""Fetching one tile's Sentinel-2 and Sentinel-1 time series into its stacks, the reference's way.

Each scene is read window-only through a rasterio ``WarpedVRT`` onto the exact work-window grid
(tile CRS, window transform and size), so our data carry no sub-pixel shift (the reference's
stackstac snapping does, UPSTREAM.md §1.2). The encodings are the reference's (UPSTREAM.md §0–1):

* S2: SCL classes {0, 1, 2, 3, 8, 9} are invalid; same-day granules merge per pixel by the first
  granule that is valid there, in the reference's order: by datetime with a stable sort, so that
  granules of one datetime keep the search's order (id descending on MPC and Earth Search);
  reflectance is resampled as the model family was trained (``FetchOptions.s2_method``: nearest
  for v1.x, bilinear for v2), harmonised by the source's rule, NaN -> 0, then cast to uint16 by
  truncation. Where no granule is valid the mask is 0 and the values are the first granule's (the
  reference takes a random granule, unseeded; for a single-granule day both are the same).
* S1: code = trunc(clip((20·log10(γ0) + 50)·200, 0, 32767)) for finite γ0 > 0, else 0, computed in
  the precision the reference read the feed in (float32 for OPERA's bursts, which it warps with
  rasterio; float64 for MPC's, which it stacks with stackstac); a polarisation of an item covering
  less than the minimum is dropped; same-day same-orbit items merge "first non-zero wins" (same
  order as S2). OPERA's layover/shadow pixels are kept, as the reference keeps them (it never
  reads the mask layer); ``fetch.s1_mask_layover`` drops them.

Every one of these choices is recorded in the stacks (``stack.Preprocessing``).

Dates are processed in ascending order and appended to the stack as they come; the band reads of
one date run a few at a time (``PARALLEL_READS``), so memory holds the date being built and the
reads in flight. Each read signs its href anew (MPC SAS tokens expire), and a failed signed read
is signed again and retried. A scene that cannot be read for a permanent reason (gone, refused after
signing anew, undecodable after fresh reads) is skipped and recorded in the stack's ``skipped``,
with any credential cut out of the reason; a transient failure (an outage, throttling) that
outlasts the retries fails the tile with ``SourceUnavailable`` instead, so that a rerun completes
it. A tile that skipped more than ``max_skipped_pct`` of its scenes fails.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pystac
from rasterio.enums import Resampling
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from shapely.geometry import Point, shape
from tqdm import tqdm

from tessera.errors import UserError
from tessera.fetch.encode import encode_s1, encode_s2, has_s1_code, valid_scl
from tessera.fetch.reader import PARALLEL_READS, SceneUnreadable, WindowReader
from tessera.grid import Tile
from tessera.layout import WorkTile
from tessera.models import GRANULE_ORDER, S1_LAYOVER_KEPT, S1_LAYOVER_MASKED
from tessera.options import FetchOptions
from tessera.period import ALL_ORBITS, S1_ORBIT_DIRECTIONS, WHOLE_YEAR, DateRange, Period, kept_orbits, orbit_of
from tessera.sources import S1_MASK, S1_POLARISATIONS, S2_BANDS, S2_SCL, Source, cached_search, utc_date
from tessera.stack import MAX_CHUNK, S1_CHANNELS, Preprocessing, StackGrid, chunk_edge, write_s1, write_s2

# The reference searches S2 with eo:cloud_cover < 100 (its S2_MAX_CLOUD default).
S2_MAX_CLOUD_PCT = 100.0
RESAMPLING = {"bilinear": Resampling.bilinear, "nearest": Resampling.nearest}



def window_bbox_lonlat(tile: Tile, window: Window) -> tuple[float, float, float, float]:
    """(west, south, east, north) in degrees of a work window (edges densified).

    Next to ±180° west > east (the box crosses the antimeridian; searches split it, see
    ``tessera.sources.stac.split_bbox``). A window that reaches a pole spans every longitude.
    """
    left, top = tile.window_transform(window) @ (0, 0)
    right, bottom = tile.window_transform(window) @ (window.width, window.height)
    west, south, east, north = transform_bounds(f"EPSG:{tile.epsg}", "EPSG:4326", left, bottom, right, top, densify_pts=21)
    area = tile.pixel_box(window)
    for pole in (90.0, -90.0):
        if area.intersects(tile.project(Point(0.0, pole))):
            return (-180.0, min(south, pole), 180.0, max(north, pole))
    return west, south, east, north


def _in_datetime_order(items: Iterable[pystac.Item]) -> list[pystac.Item]:
    """By datetime, items of one datetime in the order given (the search's): the reference's
    stackstac sorts with a stable sort and merges "first valid wins" in that order."""
    return sorted(items, key=lambda item: item.datetime or item.common_metadata.start_datetime)


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
    """Yield (key, result) per group in ascending key order; scenes that fail are recorded and the
    group is rebuilt without them (``build`` returns None for a group that is not kept)."""
    for key in tqdm(sorted(groups), desc=desc, unit="date", file=sys.stderr):
        items = groups[key]
        while items:
            try:
                result = build(key, items)
                break
            except SceneUnreadable as failure:
                skipped.update(failure.failures)
                items = [item for item in items if item.id not in failure.failures]
        else:
            result = None
        if result is not None:
            yield key, result


def _too_few(tile: Tile, sensor: str, dates: DateRange, usable: int, min_scenes: int, skipped: dict[str, str],
             searched: int, other_orbit: int = 0) -> UserError:
    """Why a tile has too few dates, and what to change: failed scenes (rerun), none found (the
    period or the orbit filter), or too little valid coverage (the thresholds)."""
    reasons, fixes = [], []
    if skipped:
        listed = "; ".join(f"{item_id}: {reason}" for item_id, reason in list(skipped.items())[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        reasons.append(f"failed scenes: {listed}{more}")
        fixes.append("rerun if the source had trouble")
    if other_orbit:
        reasons.append(f"fetch.s1_orbit_state left out all {other_orbit} scenes found (the other orbit direction)"
                       if searched == 0 else f"fetch.s1_orbit_state left out {other_orbit} of the other orbit direction")
        fixes.append("keep both directions")
    if searched == 0 and not other_orbit:
        reasons.append("no scene found")
        fixes.append("widen config period" if dates.days < DateRange.whole_year(dates.start.year).days
                     else "check the source's coverage of this tile")
    if searched and not skipped:
        reasons.append(f"no scene failed; {searched} scenes found, the rest had too little valid coverage")
    if searched:
        fixes.append("lower fetch.min_coverage_pct")
    fixes.append("lower fetch.min_scenes")
    return UserError(f"tile {tile.name}: {usable} usable {sensor} dates in {dates}, fewer than "
                     f"fetch.min_scenes={min_scenes} ({'; '.join(reasons)}): {', or '.join(fixes)}")


def _too_many_skipped(tile: Tile, sensor: str, skipped: dict[str, str], found: int, max_skipped_pct: float) -> None:
    """A tile that lost more than ``max_skipped_pct`` of its scenes fails: its time series would
    differ from a clean one's by more than a few dates."""
    if found and 100.0 * len(skipped) / found > max_skipped_pct:
        listed = "; ".join(f"{item_id}: {reason}" for item_id, reason in list(skipped.items())[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise UserError(
            f"tile {tile.name}: {len(skipped)} of {found} {sensor} scenes were skipped, more than "
            f"fetch.max_skipped_pct={max_skipped_pct:g}% ({listed}{more}): check these scenes at the source; "
            "raise fetch.max_skipped_pct to accept the tile without them")


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _grid(tile: Tile, window: Window, year: int, source: Source, preprocessing: Preprocessing) -> StackGrid:
    return StackGrid(tile.name, year, window, f"EPSG:{tile.epsg}", tile.window_transform(window), source.name,
                     source.data_kind, preprocessing)


def preprocessing_of(source: Source, s2_resampling: str, mask_layover: bool, period: Period,
                     s1_orbit_state: str) -> Preprocessing:
    """What a fetch from ``source`` with these options does to the numbers (recorded in the stacks)."""
    return Preprocessing(s2_resampling, source.harmonisation, S1_LAYOVER_MASKED if mask_layover else S1_LAYOVER_KEPT,
                         GRANULE_ORDER, str(period), s1_orbit_state)


def _opera_shaped(source: Source) -> bool:
    """A feed with OPERA's mask layer is read as the reference reads OPERA: rasterio, float32."""
    return S1_MASK in source.s1.asset_keys


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
    mask_layover: bool = False,
    period: Period = WHOLE_YEAR,
    s1_orbit_state: str = ALL_ORBITS,
    search_cache: Path | None = None,
    patch_size: int = MAX_CHUNK,
    parallel_reads: int = PARALLEL_READS,
    max_skipped_pct: float = 100.0,
) -> dict:
    """Build ``out`` (s2.zarr) for a work window of a tile; returns a small report.

    ``resampling`` is the S2 reflectance's (the caller passes the family's); the scenes are those of
    ``period`` of ``year``; ``mask_layover`` and ``s1_orbit_state`` are only recorded here (both
    stores record every choice of the fetch).

    ``roi_mask`` (H, W) marks the ROI pixels coverage is measured on (default: the whole window).
    Raises UserError naming the tile and the failed scenes if fewer than ``min_scenes`` dates are usable.
    """
    reader = WindowReader(tile, window, source.s2, parallel_reads)
    coverage = _Coverage(roi_mask, (reader.height, reader.width))
    band_resampling = RESAMPLING[resampling]
    dates = period.dates(year)
    found = cached_search(source, source.s2, window_bbox_lonlat(tile, window), dates, search_cache)
    items = [item for item in found if item.properties.get("eo:cloud_cover", 0.0) < S2_MAX_CLOUD_PCT]
    groups = defaultdict(list)
    for item in items:
        groups[utc_date(item)].append(item)
    low_coverage: list[str] = []

    def build(date: dt.date, day_items: list[pystac.Item]):
        day_items = _in_datetime_order(day_items)
        # Which granule each pixel takes: the first (datetime order) whose SCL is valid there.
        scl_reads = {read[0].id: warped for read, warped in
                     reader.read_all([(item, S2_SCL, Resampling.nearest) for item in day_items])}
        chosen = np.full((reader.height, reader.width), -1, np.int32)
        for index, item in enumerate(day_items):
            scl, in_scene = scl_reads.pop(item.id)
            chosen[(chosen < 0) & in_scene & valid_scl(scl)] = index
        valid = chosen >= 0
        if not coverage.enough(valid, min_coverage_pct):
            low_coverage.append(date.isoformat())
            return None
        value_from = np.where(valid, chosen, 0)
        contributing = np.unique(value_from)
        # The pixels each contributing granule gives, once per date; None: every pixel, from the only one.
        part_of = {day_items[index].id: None if len(contributing) == 1 else value_from == index
                   for index in contributing}
        reads = [(day_items[index], band, band_resampling) for band in S2_BANDS for index in contributing]
        bands = np.empty((reader.height, reader.width, len(S2_BANDS)), np.uint16)
        for (item, band, _), (values, in_scene) in reader.read_all(reads):
            band_values = bands[..., S2_BANDS.index(band)]
            take = part_of[item.id]
            if take is None:
                band_values[...] = encode_s2(values, item, source, in_scene)
            else:  # harmonisation and the cast work pixel by pixel, so each granule's part is encoded alone
                band_values[take] = encode_s2(values[take], item, source, in_scene[take])
        return [item.id for item in day_items], bands, valid.astype(np.uint8)

    kept: list[str] = []
    preprocessing = preprocessing_of(source, resampling, mask_layover, period, s1_orbit_state)
    grid = _grid(tile, window, year, source, preprocessing)
    with reader.gdal_messages, write_s2(out, grid, chunk=chunk_edge(patch_size)) as stack:
        for date, (scene_ids, bands, mask) in _each_date(groups, build, stack.skipped, f"{tile.name} S2"):
            stack.append(date, scene_ids, bands, mask)
            kept.append(date.isoformat())
        if len(stack) < min_scenes:
            raise _too_few(tile, "Sentinel-2", dates, len(stack), min_scenes, stack.skipped, len(items))
        _too_many_skipped(tile, "Sentinel-2", stack.skipped, len(items), max_skipped_pct)
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
    resampling: str | None = None,
    s2_resampling: str = "bilinear",
    mask_layover: bool = False,
    period: Period = WHOLE_YEAR,
    s1_orbit_state: str = ALL_ORBITS,
    search_cache: Path | None = None,
    patch_size: int = MAX_CHUNK,
    parallel_reads: int = PARALLEL_READS,
    max_skipped_pct: float = 100.0,
) -> dict:
    """Build ``out`` (s1.zarr) for a work window of a tile; returns a small report.

    Items are grouped by UTC date and ``sat:orbit_state``; items without an orbit state are skipped
    and recorded. With an ``s1_orbit_state`` other than ``both``, the other direction's items are
    left out (its series stays empty, as the reference's stacker writes it). With ``mask_layover``,
    pixels of the feed's mask layer (OPERA's layover/shadow) count as no data. ``resampling`` (γ0)
    defaults to the source's (the reference's for it); ``s2_resampling`` is only recorded. Otherwise
    as ``fetch_s2``.
    """
    reader = WindowReader(tile, window, source.s1, parallel_reads)
    coverage = _Coverage(roi_mask, (reader.height, reader.width))
    gamma0_resampling = RESAMPLING[resampling or source.s1_resampling]
    dates = period.dates(year)
    found = cached_search(source, source.s1, window_bbox_lonlat(tile, window), dates, search_cache)
    groups = defaultdict(list)
    no_orbit = {}
    other_orbit = 0
    for item in found:
        orbit = orbit_of(item.properties)
        if orbit in kept_orbits(s1_orbit_state):
            groups[(utc_date(item), orbit)].append(item)
        elif orbit in S1_ORBIT_DIRECTIONS:
            other_orbit += 1
        else:
            no_orbit[item.id] = f"sat:orbit_state is {item.properties.get('sat:orbit_state')!r}, not ascending/descending"
    layers = [(band, gamma0_resampling) for band in S1_POLARISATIONS]
    if mask_layover and S1_MASK in source.s1.asset_keys:
        layers.append((S1_MASK, Resampling.nearest))
    gamma0_dtype = np.float32 if _opera_shaped(source) else np.float64
    low_coverage: list[str] = []

    def build(key: tuple[dt.date, str], group_items: list[pystac.Item]):
        group_items = _in_datetime_order(group_items)
        read = {(item.id, band): data for (item, band, _), data in
                reader.read_all([(item, band, how) for item in group_items for band, how in layers])}
        merged = np.zeros((reader.height, reader.width, S1_CHANNELS), np.int16)
        used = []
        for item in group_items:
            mask_read = read.pop((item.id, S1_MASK), None)
            # Layover, shadow, or outside the mask layer: once per item, for both polarisations.
            masked = None if mask_read is None else (mask_read[0] != 0) | ~mask_read[1]
            contributed = False
            for channel, polarisation in enumerate(S1_POLARISATIONS):
                values, in_scene = read.pop((item.id, polarisation))
                gamma0 = values.astype(gamma0_dtype)
                gamma0[~in_scene] = np.nan
                if masked is not None:
                    gamma0[masked] = np.nan
                # The reference drops a polarisation of an item that covers too little of the ROI.
                if coverage.pct(np.isfinite(gamma0) & (gamma0 > 0)) < min_coverage_pct:
                    continue
                code = encode_s1(gamma0)
                empty = merged[..., channel] == 0
                merged[..., channel][empty] = code[empty]
                contributed = True
            if contributed:
                used.append(item.id)
        if not used or not coverage.enough(has_s1_code(merged), min_coverage_pct):
            low_coverage.append(f"{key[0].isoformat()} {key[1]}")
            return None
        return used, merged

    kept: list[str] = []
    preprocessing = preprocessing_of(source, s2_resampling, mask_layover, period, s1_orbit_state)
    grid = _grid(tile, window, year, source, preprocessing)
    with reader.gdal_messages, write_s1(out, grid, chunk=chunk_edge(patch_size)) as stack:
        stack.skipped.update(no_orbit)
        for (date, orbit), (scene_ids, sar) in _each_date(groups, build, stack.skipped, f"{tile.name} S1"):
            stack.append(orbit, date, scene_ids, sar)
            kept.append(f"{date.isoformat()} {orbit}")
        considered = len(found) - other_orbit
        if len(stack) < min_scenes:
            raise _too_few(tile, "Sentinel-1", dates, len(stack), min_scenes, stack.skipped, considered, other_orbit)
        _too_many_skipped(tile, "Sentinel-1", stack.skipped, considered, max_skipped_pct)
        skipped = dict(stack.skipped)
    return _report(tile, "s1", out, found=len(found), kept=kept, low_coverage=low_coverage, skipped=skipped,
                   excluded_other_orbit=other_orbit)


# --- what a fetch would read ---------------------------------------------------------------------


def print_scenes(source: Source, tile: Tile, window: Window, year: int, *, period: Period = WHOLE_YEAR,
                 s1_orbit_state: str = ALL_ORBITS, work: WorkTile | None = None, file=None) -> None:
    """Print the scenes a fetch of this work window would consider, reading no pixels.

    One line per scene: UTC date, platform, orbit direction and relative orbit, cloud cover (S2),
    percentage of the work window inside the scene's footprint, and its id. The searches are the
    fetch's own: with ``work`` (the tile's work folder) they are cached there and reused by it.
    """
    file = sys.stdout if file is None else file
    bbox = window_bbox_lonlat(tile, window)
    window_area = tile.pixel_box(window)
    dates = period.dates(year)
    for sensor, feed in (("s2", source.s2), ("s1", source.s1)):
        cache = None if work is None else work.search(sensor)
        items = _in_datetime_order(cached_search(source, feed, bbox, dates, cache))
        if sensor == "s1":
            items = [item for item in items if orbit_of(item.properties) in kept_orbits(s1_orbit_state)]
        print(f"{tile.name} {dates} {sensor.upper()} from {source.name}: {len(items)} scenes", file=file)
        print(f"  {'date':<10}  {'platform':<12} {'orbit':<15} {'cloud %':>7} {'coverage %':>10}  id", file=file)
        for item in items:
            properties = item.properties
            orbit = f"{properties.get('sat:orbit_state') or '-'} R{properties.get('sat:relative_orbit') or '?'}"
            cloud = properties.get("eo:cloud_cover")
            cloud_text = "-" if cloud is None else f"{cloud:.1f}"
            if item.geometry is None:
                coverage_text = "?"
            else:
                footprint = tile.project(shape(item.geometry))
                coverage_text = f"{100.0 * footprint.intersection(window_area).area / window_area.area:.1f}"
            print(f"  {utc_date(item).isoformat():<10}  {str(properties.get('platform') or '-'):<12} {orbit:<15} "
                  f"{cloud_text:>7} {coverage_text:>10}  {item.id}", file=file)


# --- the fetch stage of one tile -----------------------------------------------------------------


def fetch_tile(tile: Tile, window: Window, year: int, roi: str, source_config: Mapping | str, work: WorkTile,
               observations: Path, *, options: FetchOptions, demo_catalog: Path | None = None) -> None:
    """Everything the fetch rule makes for a tile-year: the ROI mask, the S2 and S1 stacks, the
    stack index and the per-pixel observation counts."""
    from tessera.fetch.observations import write_observation_counts
    from tessera.roi import read_roi, read_roi_mask, write_roi_mask
    from tessera.sources import open_source
    from tessera.stack import write_stack_index

    write_roi_mask(read_roi(roi), tile, work.roi_mask)
    roi_mask = read_roi_mask(work.roi_mask, window=window)
    period, s1_orbit_state = options.time_series
    common = dict(roi_mask=roi_mask, min_coverage_pct=options.min_coverage_pct, min_scenes=options.min_scenes,
                  patch_size=options.patch_size, mask_layover=options.s1_mask_layover,
                  max_skipped_pct=options.max_skipped_pct, period=period, s1_orbit_state=s1_orbit_state)
    with open_source(source_config, demo_catalog=demo_catalog) as source:
        fetch_s2(tile, window, year, source, work.s2, search_cache=work.search("s2"),
                 resampling=options.s2_method, **common)
        fetch_s1(tile, window, year, source, work.s1, search_cache=work.search("s1"),
                 s2_resampling=options.s2_method, **common)
    write_stack_index(work.s2, work.s1, work.stack_index)
    write_observation_counts(work.stack_index, observations)
