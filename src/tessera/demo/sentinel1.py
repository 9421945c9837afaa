"""The demo's synthetic Sentinel-1 RTC items: ascending and descending passes, some split into two
overlapping slices, gamma0 COGs shaped like Planetary Computer's ``sentinel-1-rtc`` items."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pystac
import shapely
from affine import Affine
from shapely import box
from shapely.geometry.base import BaseGeometry

from tessera.demo.world import (
    Place,
    World,
)
from tessera.grid import utm_epsg
from tessera.demo.scenes import Granule, _cog_asset, _days, _item, _margin_degrees

S1_COLLECTION = "sentinel-1-rtc"
_S1_EXTENSIONS = [
    "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
    "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
]

# Sentinel-1A over the area: relative orbit, time of day (UTC) and first day offset in the year.
_S1_PASSES = {"ascending": (88, time(17, 25, 10), 4), "descending": (37, time(5, 50, 30), 8)}
_S1_SLICE_SECONDS = 18.0
_S1_EQUIVALENT_LOOKS = 4.4
_S1_NODATA = -32768.0
# Every fourth pass comes as two slices overlapping across this band around a tilted boundary.
_S1_SPLIT_EVERY = 4
_S1_SLICE_OVERLAP_METRES = 200.0
_S1_SLICE_TILT_DEGREES = 10.0
# S1A orbit numbering: a 175-orbit, 12-day repeat cycle; relative = (absolute - 73) mod 175 + 1.
# Anchor from MPC item S1A_IW_GRDH_1SDV_20250311T044231_..._058252_073302 (datatake 0x073302).
_S1A_ANCHOR = (datetime(2025, 3, 11, 4, 42, 40, tzinfo=UTC), 58252, 471810)
_S1_GRID_SNAP_METRES = 20.0


def s1_items(world: World, year: int, bbox, revisit_days: int, staging: Path) -> Iterator[pystac.Item]:
    margin_lon, margin_lat = _margin_degrees(bbox)
    west, south, east, north = bbox
    granule = Granule.covering(
        (max(west - margin_lon, -180.0), south - margin_lat, min(east + margin_lon, 180.0), north + margin_lat),
        utm_epsg((west + east) / 2, (south + north) / 2),
        _S1_GRID_SNAP_METRES,
    )
    place = granule.place(world, 10)
    passes = [
        (datetime.combine(day, overpass, tzinfo=UTC), orbit_state, relative_orbit, number % _S1_SPLIT_EVERY == 1)
        for orbit_state, (relative_orbit, overpass, first_offset) in _S1_PASSES.items()
        for number, day in enumerate(_days(year, first_offset, revisit_days))
    ]
    for when, orbit_state, relative_orbit, split in sorted(passes):
        yield from _s1_pass_items(world, granule, place, when, orbit_state, relative_orbit, split, staging)


def _s1_absolute_orbit(when: datetime, relative_orbit: int) -> int:
    """The S1A absolute orbit near ``when`` whose relative orbit is ``relative_orbit``."""
    anchor_time, anchor_orbit, _ = _S1A_ANCHOR
    approximate = anchor_orbit + round((when - anchor_time).total_seconds() / (12 * 86400 / 175))
    shift = (relative_orbit - ((approximate - 73) % 175 + 1)) % 175
    return approximate + (shift if shift <= 87 else shift - 175)


def _s1_pass_items(world: World, granule: Granule, place: Place, when: datetime, orbit_state: str,
                   relative_orbit: int, split: bool, staging: Path) -> Iterator[pystac.Item]:
    day = when.date()
    vv, vh = world.backscatter(place, day, orbit_state)
    speckle = world.rng("speckle", day.toordinal(), relative_orbit)
    # Multi-looked intensity speckle: gamma distributed with mean 1 and ENL shape.
    vv = vv * speckle.gamma(_S1_EQUIVALENT_LOOKS, 1 / _S1_EQUIVALENT_LOOKS, vv.shape)
    vh = vh * speckle.gamma(_S1_EQUIVALENT_LOOKS, 1 / _S1_EQUIVALENT_LOOKS, vh.shape)
    absolute_orbit = _s1_absolute_orbit(when, relative_orbit)
    # Datatakes are numbered about 8.1 per orbit (see the anchor); only the item ids show it.
    datatake = round(_S1A_ANCHOR[2] + (absolute_orbit - _S1A_ANCHOR[1]) * 8.1)
    half = timedelta(seconds=_S1_SLICE_SECONDS / 2)
    full_extent = box(*granule.bounds)
    if not split:
        slices = [(full_extent, when - half, when + half, 12)]
    else:
        # Descending passes fly south, so their northern slice comes first.
        northern, southern = _slice_extents(granule)
        first, second = (northern, southern) if orbit_state == "descending" else (southern, northern)
        overlap = timedelta(seconds=2)
        slices = [
            (first, when - 2 * half + overlap, when + overlap, 12),
            (second, when - overlap, when + 2 * half - overlap, 13),
        ]
    transform, width, height = granule.grid(10)
    for extent, start, end, slice_number in slices:
        item_id = f"S1A_IW_GRDH_1SDV_{start:%Y%m%dT%H%M%S}_{end:%Y%m%dT%H%M%S}_{absolute_orbit:06d}_{datatake:06X}_rtc"
        item_dir = staging / S1_COLLECTION / item_id
        item_dir.mkdir(parents=True)
        rows = _rows_touching(extent, transform, height)
        slice_transform = transform @ Affine.translation(0, rows.start)
        inside = _inside(extent, slice_transform, width, rows.stop - rows.start)
        slice_granule = Granule(granule.epsg, _bounds_of(slice_transform, width, rows.stop - rows.start))
        assets = {}
        for key, gamma0, description in (("vh", vh, "horizontal receive"), ("vv", vv, "vertical receive")):
            values = np.where(inside, gamma0[rows], _S1_NODATA).astype(np.float32)
            polarisation = key.upper()
            assets[key] = _cog_asset(
                item_dir / f"{key}.tif", values, slice_granule, 10, nodata=_S1_NODATA, resampling="average",
                title=f"{polarisation}: vertical transmit, {description}",
                extra={
                    "description": (
                        f"Terrain-corrected gamma naught values of signal transmitted with vertical polarization and received "
                        f"with {description.split()[0]} polarization with radiometric terrain correction applied."
                    ),
                    "raster:bands": [{"nodata": _S1_NODATA, "data_type": "float32", "spatial_resolution": 10.0}],
                },
                with_projection=False,
            )
        properties = {
            "platform": "SENTINEL-1A",
            "s1:shape": [width, rows.stop - rows.start],
            "proj:bbox": list(slice_granule.bounds),
            "proj:epsg": granule.epsg,
            "proj:shape": [rows.stop - rows.start, width],
            "end_datetime": pystac.utils.datetime_to_str(end),
            "constellation": "Sentinel-1",
            "s1:resolution": "high",
            "proj:transform": list(slice_transform),  # all 9 coefficients, as on MPC
            "s1:datatake_id": str(datatake),
            "start_datetime": pystac.utils.datetime_to_str(start),
            "s1:slice_number": str(slice_number),
            "s1:total_slices": "24",
            "sar:looks_range": 5,
            "sat:orbit_state": orbit_state,
            "sar:product_type": "GRD",
            "sar:looks_azimuth": 1,
            "sar:polarizations": ["VV", "VH"],
            "sar:frequency_band": "C",
            "sat:absolute_orbit": absolute_orbit,
            "sat:relative_orbit": relative_orbit,
            "sar:instrument_mode": "IW",
            "sar:center_frequency": 5.405,
            "sar:observation_direction": "right",
            "sar:looks_equivalent_number": _S1_EQUIVALENT_LOOKS,
        }
        midpoint = start + (end - start) / 2
        yield _item(item_id, extent, granule.epsg, midpoint, properties, _S1_EXTENSIONS, assets)


def _slice_extents(granule: Granule) -> tuple[BaseGeometry, BaseGeometry]:
    """Northern and southern slice footprints: split along a tilted line, overlapping across it."""
    west, south, east, north = granule.bounds
    centre_x, centre_y = (west + east) / 2, (south + north) / 2
    slope = math.tan(math.radians(_S1_SLICE_TILT_DEGREES))
    reach = (east - west) + (north - south)

    def below(offset: float) -> BaseGeometry:
        def line(x: float) -> float:
            return centre_y + offset + slope * (x - centre_x)
        x0, x1 = west - reach, east + reach
        return shapely.Polygon([(x0, line(x0)), (x1, line(x1)), (x1, south - reach), (x0, south - reach)])

    extent = box(*granule.bounds)
    half_overlap = _S1_SLICE_OVERLAP_METRES / 2
    return extent.difference(below(-half_overlap)), extent.intersection(below(half_overlap))


def _rows_touching(extent: BaseGeometry, transform: Affine, height: int) -> slice:
    _, south, _, north = extent.bounds
    top = max(0, math.floor((transform.f - north) / -transform.e))
    bottom = min(height, math.ceil((transform.f - south) / -transform.e))
    return slice(top, bottom)


def _inside(extent: BaseGeometry, transform: Affine, width: int, height: int) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x, y = transform @ (cols, rows)
    return shapely.contains_xy(extent, x, y)


def _bounds_of(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    west, north = transform @ (0, 0)
    east, south = transform @ (width, height)
    return west, south, east, north
