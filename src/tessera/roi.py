"""Reading a region of interest into one WGS84 geometry, and rasterising it onto a tile.

Accepted: a bbox string ``"min_lon,min_lat,max_lon,max_lat"`` (WGS84, lon first as in geotessera),
a vector file (GeoJSON, GeoPackage, Shapefile, anything GDAL's OGR reads) in any CRS, or a GeoTIFF
mask in any CRS (pixels > 0 are inside).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import shapely
from pyproj import CRS
from shapely import box
from shapely.geometry.base import BaseGeometry

from tessera.errors import UserError
from tessera.grid import Tile, reproject, roi_in_tile
from tessera.io import atomic_path, check_raster_complete

_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"
_BBOX = re.compile(rf"^{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}$")
_RASTER_SUFFIXES = {".tif", ".tiff"}


def is_bbox(spec: str) -> bool:
    return bool(_BBOX.match(str(spec)))


def parse_bbox(spec: str) -> tuple[float, float, float, float]:
    min_lon, min_lat, max_lon, max_lat = (float(v) for v in str(spec).split(","))
    if not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180 and -90 <= min_lat <= 90 and -90 <= max_lat <= 90):
        raise UserError(f"roi bbox {spec!r} is out of range: expected min_lon,min_lat,max_lon,max_lat in degrees with lon in [-180, 180] and lat in [-90, 90]")
    if min_lon >= max_lon or min_lat >= max_lat:
        raise UserError(f"roi bbox {spec!r} is reversed or empty: expected min_lon,min_lat,max_lon,max_lat with min < max")
    return min_lon, min_lat, max_lon, max_lat


def _refuse_malformed_bbox(spec: str) -> None:
    """A UserError for comma-separated numbers that are not a usable bbox (rather than "no such file")."""
    if "," not in spec:
        return
    try:
        values = [float(part) for part in spec.split(",")]
    except ValueError:
        return
    if len(values) != 4:
        raise UserError(f"roi bbox {spec!r} has {len(values)} numbers: give four, min_lon,min_lat,max_lon,max_lat")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"roi bbox {spec!r} has a non-finite number: give four finite degrees, min_lon,min_lat,max_lon,max_lat")


def read_roi(spec: str | Path) -> BaseGeometry:
    """The ROI as one valid (Multi)Polygon in WGS84 lon/lat."""
    if is_bbox(str(spec)):
        return box(*parse_bbox(str(spec)))
    path = Path(spec)
    if not path.exists():
        _refuse_malformed_bbox(str(spec))
        raise UserError(f"roi file {str(path)!r} does not exist: give an existing GeoJSON/GeoPackage/Shapefile/GeoTIFF path or a bbox 'min_lon,min_lat,max_lon,max_lat'")
    if path.suffix.lower() in _RASTER_SUFFIXES:
        geometry, crs = _read_raster_mask(path)
    else:
        geometry, crs = _read_vector(path)
    geometry = shapely.make_valid(geometry)
    lonlat = _to_lonlat(geometry, crs)
    polygons = shapely.get_parts(lonlat)
    polygons = [p for p in polygons if p.geom_type in ("Polygon", "MultiPolygon") and p.area > 0]
    if not polygons:
        raise UserError(f"roi file {str(path)!r} has no area (points or lines only): buffer the features into polygons first")
    roi = shapely.union_all(polygons)
    west, south, east, north = roi.bounds
    if west < -180 or east > 180 or south < -90 or north > 90:
        raise UserError(f"roi file {str(path)!r} reaches outside lon [-180, 180] / lat [-90, 90] after reprojection to WGS84: check its CRS")
    return roi


def _read_vector(path: Path) -> tuple[BaseGeometry, CRS]:
    # Imported here: pyogrio brings geopandas and pandas (about a second), which the Snakefile's
    # parse of a bbox ROI, on every cluster job, does not need.
    import pyogrio

    try:
        meta, _, wkb, _ = pyogrio.raw.read(path, read_geometry=True, columns=[])
    except Exception as exc:  # pyogrio raises several GDAL-derived types for unreadable files
        raise UserError(f"roi file {str(path)!r} cannot be read as a vector file ({exc}): give a GeoJSON, GeoPackage or Shapefile") from None
    if wkb is None or len(wkb) == 0:
        raise UserError(f"roi file {str(path)!r} has no features: draw the region of interest as at least one polygon")
    if not meta.get("crs"):
        raise UserError(f"roi file {str(path)!r} has no CRS (e.g. a Shapefile without .prj): add one, e.g. with `ogr2ogr -a_srs EPSG:4326`")
    geometries = [g for g in shapely.from_wkb(list(wkb)) if g is not None and not g.is_empty]
    if not geometries:
        raise UserError(f"roi file {str(path)!r} has only empty geometries: draw the region of interest as at least one polygon")
    return shapely.union_all(geometries), CRS.from_user_input(meta["crs"])


def _read_raster_mask(path: Path) -> tuple[BaseGeometry, CRS]:
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise UserError(f"roi mask {str(path)!r} has no CRS: assign one, e.g. with `gdal_edit.py -a_srs EPSG:32631`")
            inside = src.read(1) > 0
            transform, crs = src.transform, CRS.from_user_input(src.crs)
    except rasterio.RasterioIOError as exc:
        raise UserError(f"roi mask {str(path)!r} cannot be read as a GeoTIFF ({exc})") from None
    if not inside.any():
        raise UserError(f"roi mask {str(path)!r} has no pixel > 0: mark the region of interest with non-zero values")
    shapes = rasterio.features.shapes(inside.astype(np.uint8), mask=inside, transform=transform)
    return shapely.union_all([shapely.geometry.shape(geom) for geom, _ in shapes]), crs


def _to_lonlat(geometry: BaseGeometry, crs: CRS) -> BaseGeometry:
    if crs.equals(CRS.from_epsg(4326)):
        return geometry
    # Densify in the source CRS so that long straight edges stay true after reprojection.
    return reproject(geometry, crs, 4326, densify=100.0 if crs.is_projected else 0.001)


def rasterize_roi(roi_lonlat: BaseGeometry, tile: Tile) -> np.ndarray:
    """uint8 (height, width) on the tile grid: 1 where the pixel centre is inside the ROI.

    Covers the whole pixel rectangle of the tile, not only its 0.1° cell (see grid.roi_in_tile).
    """
    part = roi_in_tile(tile, roi_lonlat)
    if part.is_empty:
        return np.zeros((tile.height, tile.width), np.uint8)
    return rasterio.features.rasterize(
        [(part, 1)], out_shape=(tile.height, tile.width), transform=tile.transform, fill=0, dtype="uint8"
    )


def write_roi_mask(roi_lonlat: BaseGeometry, tile: Tile, out: str | Path) -> Path:
    """Write the ROI mask of a tile as a tiled, compressed uint8 GeoTIFF on the tile grid.

    This is also the geotessera landmask of the tile (0 = no embedding, 1 = embedding).
    """
    mask = rasterize_roi(roi_lonlat, tile)
    profile = dict(
        driver="GTiff", width=tile.width, height=tile.height, count=1, dtype="uint8", crs=tile.crs,
        transform=tile.transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
    )
    with atomic_path(out) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(mask, 1)
        check_raster_complete(tmp)
    return Path(out)


def read_roi_mask(path: str | Path, window=None) -> np.ndarray:
    """Boolean ROI mask of a tile (or of a window of it) from ``write_roi_mask``'s GeoTIFF."""
    with rasterio.open(path) as src:
        return src.read(1, window=window) > 0
