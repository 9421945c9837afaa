"""geotessera's global 0.1° grid: tiles, their UTM pixel grids, work windows and patches.

A tile is the 0.1° × 0.1° WGS84 cell named by its centre (``grid_{lon:.2f}_{lat:.2f}``). Its pixels
live in the UTM zone of the centre longitude (EPSG 326zz north of the equator, 327zz south), 10 m
square, with the origin at the westmost easting and northmost northing of the projected cell
corners and width/height the rounded projected extents — exactly geotessera's ``project_tile``, so
our tiles drop into geotessera's NPY and Zarr layouts without resampling. Tiles are independent of
the ROI, so outputs of neighbouring runs join without seams.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from affine import Affine
from pyproj import CRS, Transformer
from rasterio.windows import Window
import shapely
from shapely import box
from shapely.geometry.base import BaseGeometry

from tessera.errors import UserError

TILE_DEGREES = 0.1
PIXEL_METRES = 10.0
_TILE_NAME = re.compile(r"^grid_(-?\d+\.\d5)_(-?\d+\.\d5)$")
# Geometries are densified before projecting so that projected edges follow the true curves to
# well under a pixel: 0.001° is about 100 m along an edge.
_DENSIFY_DEGREES = 0.001


def floor_pixels(metres: float) -> int:
    """Whole 10 m pixels in a distance, rounded down; a whole number of pixels up to float noise stays whole."""
    return math.floor(round(metres / PIXEL_METRES, 6))


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the regular UTM zone of a point (no Norway/Svalbard exceptions, as geotessera)."""
    zone = min(max(int(math.floor((lon + 180.0) / 6.0)) + 1, 1), 60)
    return (32600 if lat >= 0 else 32700) + zone


def _cell_index(coord: float) -> int:
    # Round first so that a coordinate that is a cell edge up to float noise (5.99 * 10 =
    # 59.900000000000006) lands in the cell it names.
    return math.floor(round(coord / TILE_DEGREES, 9))


@dataclass(frozen=True)
class Tile:
    """One 0.1° tile: its name, centre and 10 m UTM pixel grid."""

    lon_index: int  # floor(west edge / 0.1°)
    lat_index: int  # floor(south edge / 0.1°)

    @classmethod
    def from_name(cls, name: str) -> Tile:
        match = _TILE_NAME.match(name)
        if not match:
            raise UserError(f"tile name {name!r} is not of the form grid_<lon>_<lat> with centres ending in 5 (e.g. grid_6.05_52.05)")
        return tile_at(float(match.group(1)), float(match.group(2)))

    @property
    def lon(self) -> float:
        return round((self.lon_index + 0.5) * TILE_DEGREES, 2)

    @property
    def lat(self) -> float:
        return round((self.lat_index + 0.5) * TILE_DEGREES, 2)

    @property
    def name(self) -> str:
        return f"grid_{self.lon:.2f}_{self.lat:.2f}"

    @property
    def bounds_lonlat(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) of the 0.1° cell in degrees."""
        west = round(self.lon_index * TILE_DEGREES, 2)
        south = round(self.lat_index * TILE_DEGREES, 2)
        return west, south, round(west + TILE_DEGREES, 2), round(south + TILE_DEGREES, 2)

    @property
    def epsg(self) -> int:
        return utm_epsg(self.lon, self.lat)

    @property
    def crs(self) -> CRS:
        return CRS.from_epsg(self.epsg)

    @cached_property
    def _grid(self) -> tuple[Affine, int, int]:
        west, south, east, north = self.bounds_lonlat
        to_utm = transformer(4326, self.epsg)
        (nw_x, ne_x, sw_x, se_x), (nw_y, ne_y, sw_y, se_y) = to_utm.transform(
            [west, east, west, east], [north, north, south, south]
        )
        xs, ys = (nw_x, ne_x, sw_x, se_x), (nw_y, ne_y, sw_y, se_y)
        origin_x, origin_y = min(nw_x, sw_x), max(nw_y, ne_y)
        width = round((max(xs) - min(xs)) / PIXEL_METRES)
        height = round((max(ys) - min(ys)) / PIXEL_METRES)
        return Affine(PIXEL_METRES, 0.0, origin_x, 0.0, -PIXEL_METRES, origin_y), width, height

    @property
    def transform(self) -> Affine:
        return self._grid[0]

    @property
    def width(self) -> int:
        return self._grid[1]

    @property
    def height(self) -> int:
        return self._grid[2]

    @property
    def full_window(self) -> Window:
        return Window(0, 0, self.width, self.height)

    def window_transform(self, window: Window) -> Affine:
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def project(self, geometry_lonlat: BaseGeometry) -> BaseGeometry:
        """A WGS84 geometry in this tile's UTM coordinates (densified, so edges stay true)."""
        return reproject(geometry_lonlat, 4326, self.epsg, densify=_DENSIFY_DEGREES)

    def pixel_box(self, window: Window) -> BaseGeometry:
        """The footprint of a pixel window in this tile's UTM coordinates."""
        west, north = self.window_transform(window) @ (0, 0)
        return box(west, north - window.height * PIXEL_METRES, west + window.width * PIXEL_METRES, north)

    def __str__(self) -> str:
        return self.name


def reproject(geometry: BaseGeometry, src_crs, dst_crs, *, densify: float) -> BaseGeometry:
    """Reproject a geometry, first densifying it (segments of at most ``densify`` source units)."""
    return shapely.transform(geometry.segmentize(densify), transformer(src_crs, dst_crs).transform, interleaved=False)


@functools.lru_cache(maxsize=64)
def transformer(src_crs, dst_crs) -> Transformer:
    """A lon/lat-ordered transformer between two CRSs, made once per pair: making one takes about a
    millisecond, which planning thousands of tiles would pay twice per tile. (Not for use from
    several threads at once.)"""
    return Transformer.from_crs(src_crs, dst_crs, always_xy=True)


def tile_at(lon: float, lat: float) -> Tile:
    """The tile containing a point (a point on a cell edge belongs to the cell east/north of it)."""
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise UserError(f"point ({lon}, {lat}) is outside lon [-180, 180] / lat [-90, 90]; give lon first, then lat")
    return Tile(min(_cell_index(lon), 1799), min(_cell_index(lat), 899))


def tiles_for_geometry(roi_lonlat: BaseGeometry) -> Iterator[tuple[Tile, BaseGeometry]]:
    """Tiles whose cell overlaps the ROI with positive area, with the ROI part inside each cell."""
    west, south, east, north = roi_lonlat.bounds
    for lat_index in range(_cell_index(south), _cell_index(north) + 1):
        for lon_index in range(_cell_index(west), _cell_index(east) + 1):
            tile = Tile(lon_index, lat_index)
            part = roi_lonlat.intersection(box(*tile.bounds_lonlat))
            if part.area > 0:
                yield tile, part


def roi_in_tile(tile: Tile, roi_lonlat: BaseGeometry) -> BaseGeometry:
    """The ROI in the tile's UTM coordinates, clipped to the tile's pixel rectangle.

    The rectangle is larger than the 0.1° cell (the cell is a rotated trapezoid in UTM), and a tile
    embeds every ROI pixel of its rectangle, as published tiles do: neighbouring tiles then overlap
    slightly instead of leaving sub-pixel gaps along cell edges when mosaicked.
    """
    west, south, east, north = tile.bounds_lonlat
    # Half a cell of margin holds the whole rectangle (its corners are cell corners, and its
    # edges stray from the cell's by well under half a cell at any latitude UTM is used at).
    near = roi_lonlat.intersection(box(west - TILE_DEGREES / 2, south - TILE_DEGREES / 2,
                                       east + TILE_DEGREES / 2, north + TILE_DEGREES / 2))
    return tile.project(near).intersection(tile.pixel_box(tile.full_window))


def work_window(tile: Tile, roi_in_tile_utm: BaseGeometry) -> Window | None:
    """The pixel rectangle of ``tile`` that the ROI touches, or None if it touches no pixel.

    ``roi_in_tile_utm`` is the ROI in the tile's coordinates (see :func:`roi_in_tile`).
    """
    if roi_in_tile_utm.is_empty:
        return None
    minx, miny, maxx, maxy = roi_in_tile_utm.bounds
    inverse = ~tile.transform
    col_start, row_start = inverse @ (minx, maxy)
    col_stop, row_stop = inverse @ (maxx, miny)
    col_start, row_start = max(math.floor(col_start), 0), max(math.floor(row_start), 0)
    col_stop, row_stop = min(math.ceil(col_stop), tile.width), min(math.ceil(row_stop), tile.height)
    if col_stop <= col_start or row_stop <= row_start:
        return None
    return Window(col_start, row_start, col_stop - col_start, row_stop - row_start)


def patches(window: Window, patch_size: int) -> list[Window]:
    """Cut a work window into patch_size squares, row-major; edge patches are clipped to the window."""
    out = []
    for row in range(window.row_off, window.row_off + window.height, patch_size):
        for col in range(window.col_off, window.col_off + window.width, patch_size):
            out.append(Window(
                col, row,
                min(patch_size, window.col_off + window.width - col),
                min(patch_size, window.row_off + window.height - row),
            ))
    return out


def patch_name(patch: Window) -> str:
    return f"r{patch.row_off}_c{patch.col_off}"
