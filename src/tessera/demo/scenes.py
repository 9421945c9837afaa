"""A static STAC catalog of synthetic Sentinel-2 L2A and Sentinel-1 RTC scenes over a small bbox.

The items are shaped like Planetary Computer items (``fixtures/stac/mpc-*``): the same collection
ids, property names (``proj:epsg`` rather than projection v2's ``proj:code``, lowercase
``sat:orbit_state``, ``s2:processing_baseline``...), asset keys, and per-asset ``proj:*`` fields, so
the fetch code treats them exactly like MPC items. The rasters are small cut-outs (bbox plus
``MARGIN_METRES``) written as deflate COGs with overviews.

Layout on each acquisition date:
* Sentinel-2: two granules, one in the UTM zone of the west half of the bbox and one in the zone of
  the east half, overlapping over the middle half of the bbox (in one zone, they are named as
  neighbouring MGRS tiles). Their 10/20 m grids snap to 60 m in
  their own zone, like MGRS tiles, and to nothing else.
* Sentinel-1: one granule in the UTM zone of the bbox centre, on a 20 m-snapped 10 m grid; every
  fourth pass is delivered as two adjacent slices of one datatake that overlap across a tilted
  boundary (no-data beyond it), as consecutive MPC slices do.

Determinism: every random draw is seeded from (seed, what it is for), item JSON has no wall-clock
times, and GDAL writes the same COG bytes for the same pixels, so equal inputs give equal files.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pystac
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from shapely import box
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from tessera.demo.world import (
    SCL_CLOUD_HIGH,
    SCL_CLOUD_MEDIUM,
    SCL_CLOUD_SHADOW,
    SCL_NOT_VEGETATED,
    SCL_THIN_CIRRUS,
    SCL_VEGETATION,
    SCL_WATER,
    Place,
    World,
)
from tessera.errors import UserError
from tessera.grid import reproject, utm_epsg
from tessera.io import atomic_path, check_raster_complete

S2_COLLECTION = "sentinel-2-l2a"
# Enough for any resampling kernel at the bbox edge, small enough to keep the files small.
MARGIN_METRES = 200.0
# Larger areas would make the "small" demo granules large; real sources are for real areas.
MAX_BBOX_DEGREES = 0.25
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

# Sentinel-2 band metadata as on MPC items: common name, description, centre wavelength and full
# width at half maximum (µm), ground sampling distance (m).
_S2_BANDS = {
    "B02": ("blue", "Band 2 - Blue", 0.49, 0.098, 10),
    "B03": ("green", "Band 3 - Green", 0.56, 0.045, 10),
    "B04": ("red", "Band 4 - Red", 0.665, 0.038, 10),
    "B08": ("nir", "Band 8 - NIR", 0.842, 0.145, 10),
    "B05": ("rededge", "Band 5 - Vegetation red edge 1", 0.704, 0.019, 20),
    "B06": ("rededge", "Band 6 - Vegetation red edge 2", 0.74, 0.018, 20),
    "B07": ("rededge", "Band 7 - Vegetation red edge 3", 0.783, 0.028, 20),
    "B8A": ("rededge", "Band 8A - Vegetation red edge 4", 0.865, 0.033, 20),
    "B11": ("swir16", "Band 11 - SWIR (1.6)", 1.61, 0.143, 20),
    "B12": ("swir22", "Band 12 - SWIR (2.2)", 2.19, 0.242, 20),
}
_S2_BANDS_AT = {gsd: tuple(band for band, info in _S2_BANDS.items() if info[4] == gsd) for gsd in (10, 20)}
_S2_EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
    "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
]

# Processing baseline 04.00, first used for acquisitions after 2022-01-25, adds BOA_ADD_OFFSET:
# DN = reflectance * 10000 + 1000. Earlier products (and their reprocessing on MPC) have no offset.
_FIRST_OFFSET_DATE = date(2022, 1, 26)
_BASELINES = ((date(2022, 12, 6), "05.09"), (_FIRST_OFFSET_DATE, "04.00"), (date.min, "02.12"))
BOA_ADD_OFFSET = 1000
_S2_NOISE_REFLECTANCE = 0.002
# The area's Sentinel-2 relative orbit and overpass time (late morning, descending).
_S2_RELATIVE_ORBIT = 8
_S2_OVERPASS = time(10, 46, 19, 24000)
_S2_PROCESSING_DELAY = timedelta(hours=1, minutes=52, seconds=41)


_GEOMETRY_DECIMALS = 7  # ~1 cm, as on MPC items
_S2_GRID_SNAP_METRES = 60.0  # a multiple of both pixel sizes, as MGRS tile origins are


@dataclass(frozen=True)
class Granule:
    """A rectangle in one UTM zone that scenes are cut to."""

    epsg: int
    bounds: tuple[float, float, float, float]  # west, south, east, north in metres

    @classmethod
    def covering(cls, bounds_lonlat: tuple[float, float, float, float], epsg: int, snap: float) -> Granule:
        projected = reproject(box(*bounds_lonlat), 4326, epsg, densify=0.001).bounds
        west, south = (math.floor(v / snap) * snap for v in projected[:2])
        east, north = (math.ceil(v / snap) * snap for v in projected[2:])
        return cls(epsg, (west, south, east, north))

    def grid(self, resolution: float) -> tuple[Affine, int, int]:
        west, south, east, north = self.bounds
        width, height = round((east - west) / resolution), round((north - south) / resolution)
        return Affine(resolution, 0.0, west, 0.0, -resolution, north), width, height

    def place(self, world: World, resolution: float) -> Place:
        """The world at the centres of this granule's pixels."""
        transform, width, height = self.grid(resolution)
        cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        x, y = transform @ (cols, rows)
        lon, lat = Transformer.from_crs(self.epsg, 4326, always_xy=True).transform(x, y)
        return world.place(np.asarray(lon), np.asarray(lat))

    def mgrs_tile(self, column_shift: int = 0) -> str:
        """The MGRS 100 km square holding the granule centre, e.g. 31UGT, or a square ``column_shift``
        columns east of it."""
        west, south, east, north = self.bounds
        easting, northing = (west + east) / 2, (south + north) / 2
        _, lat = Transformer.from_crs(self.epsg, 4326, always_xy=True).transform(easting, northing)
        zone = self.epsg % 100
        band = "CDEFGHJKLMNPQRSTUVWX"[min(int((lat + 80) // 8), 19)]
        column = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")[(zone - 1) % 3][int(easting // 100_000) - 1 + column_shift]
        row_offset = 5 if zone % 2 == 0 else 0
        row = "ABCDEFGHJKLMNPQRSTUV"[(int(northing // 100_000) + row_offset) % 20]
        return f"{zone:02d}{band}{column}{row}"


def generate_catalog(
    out_dir: Path,
    year: int,
    bbox: tuple[float, float, float, float],
    *,
    seed: int = 0,
    s2_revisit_days: int = 5,
    s1_revisit_days: int = 12,
) -> Path:
    """Write a static STAC catalog of synthetic S2 L2A and S1 RTC scenes for ``year`` over ``bbox``.

    ``bbox`` is (min_lon, min_lat, max_lon, max_lat) in WGS84. ``out_dir`` is replaced as a whole and
    appears only once complete. The revisit keywords thin out the dates (tests use longer ones).
    Returns the path of ``out_dir/catalog.json``; asset hrefs in it are relative to each item.
    """
    from tessera.demo import sentinel1  # it builds on this module's granules and assets

    _check_inputs(year, bbox, s2_revisit_days, s1_revisit_days)
    world = World(seed)
    out_dir = Path(out_dir)
    with atomic_path(out_dir, directory=True) as staging:
        catalog = pystac.Catalog(
            id="tessera-demo",
            title="TESSERA demo scenes (synthetic)",
            description=(
                "Synthetic, physically plausible Sentinel-2 L2A and Sentinel-1 RTC scenes made by "
                "tessera.demo. Not real observations: embeddings computed from them are meaningless."
            ),
            extra_fields={"tessera:demo": {"year": year, "bbox": list(bbox), "seed": seed}},
        )
        for collection in (
            _collection(S2_COLLECTION, "Sentinel-2 Level-2A (synthetic demo)", _s2_items(world, year, bbox, s2_revisit_days, staging)),
            _collection(sentinel1.S1_COLLECTION, "Sentinel 1 Radiometrically Terrain Corrected (RTC) (synthetic demo)", sentinel1.s1_items(world, year, bbox, s1_revisit_days, staging)),
        ):
            catalog.add_child(collection)
        # A root given as a directory whose name has a suffix (".tmp") would be taken for a file.
        catalog.normalize_hrefs(str(staging / "catalog.json"))
        catalog.make_all_asset_hrefs_relative()
        catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return out_dir / "catalog.json"


def _check_inputs(year: int, bbox: tuple[float, float, float, float], s2_revisit_days: int, s1_revisit_days: int) -> None:
    if not 2015 <= year <= 9998:
        raise UserError(f"demo year {year} is out of range: give a year from 2015 (Sentinel-2 launch) on")
    if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
        raise UserError(f"demo bbox {bbox!r} is not four finite numbers: give min_lon, min_lat, max_lon, max_lat")
    west, south, east, north = bbox
    if not (-180 <= west < east <= 180 and -80 <= south < north <= 84):
        raise UserError(f"demo bbox {bbox!r} is empty or out of range: need min < max, lon in [-180, 180], lat in [-80, 84] (UTM)")
    if east - west > MAX_BBOX_DEGREES or north - south > MAX_BBOX_DEGREES:
        raise UserError(f"demo bbox {bbox!r} is larger than {MAX_BBOX_DEGREES}° on a side: the demo source is for small areas; use a smaller ROI or a real data source")
    if s2_revisit_days < 1 or s1_revisit_days < 1:
        raise UserError(f"demo revisit days ({s2_revisit_days}, {s1_revisit_days}) must be at least 1")


def _margin_degrees(bbox: tuple[float, float, float, float]) -> tuple[float, float]:
    mid_lat = (bbox[1] + bbox[3]) / 2
    return MARGIN_METRES / (111_320.0 * math.cos(math.radians(mid_lat))), MARGIN_METRES / 110_574.0


def _s2_granules(bbox: tuple[float, float, float, float]) -> list[Granule]:
    """West and east granules, each in the UTM zone of its half's centre, overlapping in the middle."""
    west, south, east, north = bbox
    margin_lon, margin_lat = _margin_degrees(bbox)
    middle, quarter, mid_lat = (west + east) / 2, (east - west) / 4, (south + north) / 2
    return [
        Granule.covering(
            (max(w, -180.0), south - margin_lat, min(e, 180.0), north + margin_lat),
            utm_epsg(centre, mid_lat),
            _S2_GRID_SNAP_METRES,
        )
        for w, e, centre in (
            (west - margin_lon, middle + quarter, west + quarter),
            (middle - quarter, east + margin_lon, east - quarter),
        )
    ]


def _processing_baseline(day: date) -> str:
    return next(baseline for first_day, baseline in _BASELINES if day >= first_day)


def _days(year: int, first_offset: int, revisit_days: int) -> list[date]:
    first = date(year, 1, 1) + timedelta(days=first_offset % revisit_days)
    count = (date(year + 1, 1, 1) - first).days
    return [first + timedelta(days=offset) for offset in range(0, count, revisit_days)]


def _s2_tile_names(west: Granule, east: Granule) -> tuple[str, str]:
    """MGRS names of the two granules of a date; item ids (and folders) need them to differ.

    Granules of one zone are named as neighbouring tiles of that zone, whose ~10 km overlap is
    where real granules of one zone overlap.
    """
    names = west.mgrs_tile(), east.mgrs_tile()
    if names[0] != names[1]:
        return names
    # Columns are 100 km of easting from 100 to 900 km: shift east unless that leaves the zone.
    if (east.bounds[0] + east.bounds[2]) / 2 < 800_000:
        return names[0], east.mgrs_tile(column_shift=1)
    return west.mgrs_tile(column_shift=-1), names[1]


def _s2_items(world: World, year: int, bbox, revisit_days: int, staging: Path) -> Iterator[pystac.Item]:
    granules = _s2_granules(bbox)
    names = _s2_tile_names(*granules)
    places = {(index, gsd): granule.place(world, gsd) for index, granule in enumerate(granules) for gsd in (10, 20)}
    for number, day in enumerate(_days(year, 2, revisit_days)):
        when = datetime.combine(day, _S2_OVERPASS, tzinfo=UTC)
        # Sentinel-2A and -2B fly the same track half a cycle apart.
        platform = "Sentinel-2A" if number % 2 == 0 else "Sentinel-2B"
        for index, granule in enumerate(granules):
            yield _s2_item(world, granule, names[index], {gsd: places[index, gsd] for gsd in (10, 20)}, when, platform, staging)


def _s2_item(world: World, granule: Granule, tile: str, places: dict[int, Place], when: datetime, platform: str,
             staging: Path) -> pystac.Item:
    day = when.date()
    baseline = _processing_baseline(day)
    offset = BOA_ADD_OFFSET if day >= _FIRST_OFFSET_DATE else 0
    generated = when + _S2_PROCESSING_DELAY
    unit = platform[-1]
    item_id = f"S2{unit}_MSIL2A_{when:%Y%m%dT%H%M%S}_R{_S2_RELATIVE_ORBIT:03d}_T{tile}_{generated:%Y%m%dT%H%M%S}"
    item_dir = staging / S2_COLLECTION / item_id
    item_dir.mkdir(parents=True)
    noise = world.rng("sensor noise", zlib.crc32(item_id.encode()))
    assets: dict[str, pystac.Asset] = {}
    for gsd in (10, 20):
        bands = _S2_BANDS_AT[gsd]
        place = places[gsd]
        sky = world.sky(place, day)
        reflectance = world.seen_through(world.surface_reflectance(place, day, bands), sky, bands)
        reflectance += noise.normal(0.0, _S2_NOISE_REFLECTANCE, reflectance.shape)
        digital_numbers = np.clip(np.rint(reflectance * 10000) + offset, 1, 65535).astype(np.uint16)
        for band, values in zip(bands, digital_numbers):
            common_name, description, wavelength, width, _ = _S2_BANDS[band]
            assets[band] = _cog_asset(
                item_dir / f"{band}.tif", values, granule, gsd, nodata=0, resampling="average",
                title=f"{description} - {gsd}m",
                extra={"gsd": float(gsd), "eo:bands": [{
                    "name": band, "common_name": common_name, "description": description,
                    "center_wavelength": wavelength, "full_width_half_max": width,
                }]},
            )
        if gsd == 20:
            scl = world.scene_classification(place, day, sky)
            assets["SCL"] = _cog_asset(
                item_dir / "SCL.tif", scl, granule, gsd, nodata=0, resampling="nearest",
                title="Scene classfication map (SCL)",  # sic, as on MPC
                extra={"gsd": float(gsd)},
            )
    properties = {
        "platform": platform,
        "proj:epsg": granule.epsg,
        "instruments": ["msi"],
        "s2:mgrs_tile": tile,
        "constellation": "Sentinel 2",
        "eo:cloud_cover": _percentage(scl, (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_THIN_CIRRUS)),
        "s2:product_uri": f"S2{unit}_MSIL2A_{when:%Y%m%dT%H%M%S}_N{baseline.replace('.', '')}_R{_S2_RELATIVE_ORBIT:03d}_T{tile}_{generated:%Y%m%dT%H%M%S}.SAFE",
        "s2:product_type": "S2MSI2A",
        "sat:orbit_state": "descending",
        "s2:datatake_type": "INS-NOBS",
        "s2:generation_time": pystac.utils.datetime_to_str(generated),
        "sat:relative_orbit": _S2_RELATIVE_ORBIT,
        "s2:water_percentage": _percentage(scl, (SCL_WATER,)),
        "s2:processing_baseline": baseline,
        "s2:vegetation_percentage": _percentage(scl, (SCL_VEGETATION,)),
        "s2:thin_cirrus_percentage": _percentage(scl, (SCL_THIN_CIRRUS,)),
        "s2:cloud_shadow_percentage": _percentage(scl, (SCL_CLOUD_SHADOW,)),
        "s2:nodata_pixel_percentage": 0.0,
        "s2:not_vegetated_percentage": _percentage(scl, (SCL_NOT_VEGETATED,)),
        "s2:high_proba_clouds_percentage": _percentage(scl, (SCL_CLOUD_HIGH,)),
        "s2:medium_proba_clouds_percentage": _percentage(scl, (SCL_CLOUD_MEDIUM,)),
    }
    return _item(item_id, box(*granule.bounds), granule.epsg, when, properties, _S2_EXTENSIONS, assets)


def _percentage(scl: np.ndarray, classes: tuple[int, ...]) -> float:
    return round(100.0 * float(np.isin(scl, classes).mean()), 6)


def _cog_asset(path: Path, values: np.ndarray, granule: Granule, gsd: int, *, nodata: float, resampling: str,
               title: str, extra: dict, with_projection: bool = True) -> pystac.Asset:
    """Write one band as a COG and describe it as an MPC-style asset."""
    height, width = values.shape
    west, _, _, north = granule.bounds
    transform = Affine(gsd, 0.0, west, 0.0, -gsd, north)
    with rasterio.open(
        path, "w", driver="COG", width=width, height=height, count=1, dtype=values.dtype,
        crs=f"EPSG:{granule.epsg}", transform=transform, nodata=nodata,
        compress="deflate", predictor="yes", blocksize=128, overview_count=2, overview_resampling=resampling,
    ) as dst:
        dst.write(values, 1)
    # GDAL reports a write failing at close (a full disk) only as a message: the catalog's staging
    # folder must not be renamed into place around a truncated COG.
    check_raster_complete(path)
    fields = dict(extra)
    if with_projection:
        fields.update({"proj:bbox": list(granule.bounds), "proj:shape": [height, width], "proj:transform": list(transform)[:6]})
    return pystac.Asset(href=str(path), media_type=COG_MEDIA_TYPE, roles=["data"], title=title, extra_fields=fields)


def _item(item_id: str, extent: BaseGeometry, epsg: int, when: datetime, properties: dict,
          extensions: list[str], assets: dict[str, pystac.Asset]) -> pystac.Item:
    # Granules are a few km across: their straight UTM edges stay straight to ~1 mm in lon/lat.
    footprint = reproject(extent, epsg, 4326, densify=math.inf)
    footprint = shapely.transform(footprint, lambda coords: np.round(coords, _GEOMETRY_DECIMALS))
    item = pystac.Item(
        id=item_id, geometry=mapping(footprint), bbox=list(footprint.bounds), datetime=when,
        properties=properties, stac_extensions=list(extensions),
    )
    for key, asset in assets.items():
        item.add_asset(key, asset)
    return item


def _collection(collection_id: str, title: str, items: Iterator[pystac.Item]) -> pystac.Collection:
    collection = pystac.Collection(
        id=collection_id,
        title=title,
        description=f"{title}: generated by tessera.demo; not real observations.",
        extent=pystac.Extent(pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]), pystac.TemporalExtent([[None, None]])),
        license="proprietary",
    )
    collection.add_items(items)
    collection.update_extent_from_items()
    return collection
