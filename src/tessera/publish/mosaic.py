"""Per-UTM-zone mosaics of a run's tile COGs, as GDAL VRTs (and as a COG on request).

```
{out}/mosaic/{year}/tessera_{year}_epsg{code}.vrt      float32 embeddings, NaN nodata
{out}/mosaic/{year}/quicklook_{year}_epsg{code}.vrt    RGB + alpha PCA quicklook
```

**The mosaic grid.** Tiles of one zone share its CRS, but each tile's origin is the corner of its
projected 0.1° cell, not a multiple of 10 m, so two tiles' pixels are offset by a fraction of a pixel.
The zone grid is snapped to 10 m (origin: the westmost tile easting floored and the northmost tile
northing ceiled to 10 m multiples) and every tile is placed at whole-pixel offsets
``col_off = floor((tile_west - zone_west) / 10)``, ``row_off = floor((zone_north - tile_north) / 10)``,
as geotessera's Zarr zone grids do. No pixel is resampled: tile pixel (r, c) is zone pixel
(row_off + r, col_off + c), its footprint moved by less than one pixel west and north. Because the
origin is a multiple of 10 m, a tile lands on the same absolute pixel in every run's mosaic.

**Overlaps.** The UTM boxes of neighbouring cells overlap, but a tile only has embeddings inside its
own cell, so sources are composited through their masks (NaN nodata or alpha): a tile's no-data never
hides a neighbour's data. Where two tiles both have data (at most a pixel along a cell edge) the tile
later in name order wins.

A VRT is a small XML file that names the tile COGs by paths relative to itself; GDAL, QGIS,
rasterio and rioxarray read it as one raster. The structure written here is GDAL's documented
minimum: ``VRTDataset`` (size, ``SRS``, ``GeoTransform``), one ``VRTRasterBand`` per band (data type,
``NoDataValue``, ``Description``, ``ColorInterp``) holding one ``ComplexSource`` per tile (file, band,
``SrcRect``/``DstRect`` of equal size so nothing is resampled, ``UseMaskBand`` or alpha ``NODATA 0``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import rasterio
import rasterio.shutil
from affine import Affine

from tessera.errors import UserError
from tessera.grid import PIXEL_METRES, Tile, floor_pixels
from tessera.io import atomic_path, check_raster_complete
from tessera.layout import Results

_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "int16": "Int16", "uint16": "UInt16", "float32": "Float32"}



@dataclass(frozen=True)
class ZoneGrid:
    """A 10 m-snapped pixel grid holding some tiles of one UTM zone at whole-pixel offsets."""

    epsg: int
    transform: Affine
    width: int
    height: int
    offsets: dict[str, tuple[int, int]]  # tile name -> (col_off, row_off)

    @classmethod
    def for_tiles(cls, tiles: list[Tile]) -> ZoneGrid:
        epsgs = {tile.epsg for tile in tiles}
        if len(epsgs) != 1:
            raise ValueError(f"a zone grid holds tiles of one CRS, got EPSG {sorted(epsgs)}")
        west = floor_pixels(min(t.transform.c for t in tiles)) * PIXEL_METRES
        north = -floor_pixels(-max(t.transform.f for t in tiles)) * PIXEL_METRES
        offsets = {t.name: (floor_pixels(t.transform.c - west), floor_pixels(north - t.transform.f)) for t in tiles}
        width = max(offsets[t.name][0] + t.width for t in tiles)
        height = max(offsets[t.name][1] + t.height for t in tiles)
        return cls(epsgs.pop(), Affine(PIXEL_METRES, 0.0, west, 0.0, -PIXEL_METRES, north), width, height, offsets)


def _placement(tile: Tile, path: Path, grid: ZoneGrid) -> tuple[int, int, int, int]:
    """(col_off, row_off, width, height) of a raster in the zone grid. The raster is on its tile's
    grid but may cover only part of it (tile COGs hold the rows and columns that have data)."""
    with rasterio.open(path) as src:
        col_in_tile, row_in_tile = (round(v) for v in ~tile.transform @ (src.transform.c, src.transform.f))
        width, height = src.width, src.height
    col_off, row_off = grid.offsets[tile.name]
    return col_off + col_in_tile, row_off + row_in_tile, width, height


def write_vrt(sources: list[tuple[Tile, Path]], out: Path) -> Path:
    """A VRT mosaic of rasters on the grids of tiles of one zone (all with the same bands)."""
    tiles = [tile for tile, _ in sources]
    grid = ZoneGrid.for_tiles(tiles)
    with rasterio.open(sources[0][1]) as first:
        count, dtypes, descriptions, colorinterp = first.count, first.dtypes, first.descriptions, first.colorinterp
        nodata, block = first.nodata, first.block_shapes[0]
    placements = [(tile, path, _placement(tile, path, grid)) for tile, path in sorted(sources, key=lambda s: s[0].name)]
    root = ET.Element("VRTDataset", rasterXSize=str(grid.width), rasterYSize=str(grid.height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = f"EPSG:{grid.epsg}"
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in grid.transform.to_gdal())
    for band in range(count):
        gdal_type = _GDAL_TYPES[dtypes[band]]
        is_alpha = colorinterp[band].name == "alpha"
        element = ET.SubElement(root, "VRTRasterBand", dataType=gdal_type, band=str(band + 1))
        if nodata is not None:
            ET.SubElement(element, "NoDataValue").text = repr(nodata)
        if descriptions[band]:
            ET.SubElement(element, "Description").text = descriptions[band]
        ET.SubElement(element, "ColorInterp").text = colorinterp[band].name.capitalize()
        for tile, path, (col_off, row_off, width, height) in placements:
            source = ET.SubElement(element, "ComplexSource")
            ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = os.path.relpath(path, out.parent)
            ET.SubElement(source, "SourceBand").text = str(band + 1)
            ET.SubElement(source, "SourceProperties", RasterXSize=str(width), RasterYSize=str(height),
                          DataType=gdal_type, BlockXSize=str(block[1]), BlockYSize=str(block[0]))
            size = {"xSize": str(width), "ySize": str(height)}
            ET.SubElement(source, "SrcRect", xOff="0", yOff="0", **size)
            ET.SubElement(source, "DstRect", xOff=str(col_off), yOff=str(row_off), **size)
            if is_alpha:  # an alpha band's own mask is "all valid": transparent pixels are its zeros
                ET.SubElement(source, "NODATA").text = "0"
            else:
                ET.SubElement(source, "UseMaskBand").text = "true"
    ET.indent(root)
    with atomic_path(out) as tmp:
        ET.ElementTree(root).write(tmp, encoding="unicode")
    return out


def write_zone_mosaics(results: Results, tiles: list[Tile], year: int) -> list[Path]:
    """VRTs of the tiles' COGs and quicklook COGs of a year, one per UTM zone (EPSG); the paths written."""
    tiles = sorted(tiles, key=lambda t: (t.epsg, t.name))
    layers = {
        "tessera": lambda tile: results.cog(tile.name, year),
        "quicklook": lambda tile: results.quicklook(tile.name, year)[1],
    }
    written = []
    for epsg, zone_tiles in groupby(tiles, key=lambda t: t.epsg):
        zone_tiles = list(zone_tiles)
        for layer, path_of in layers.items():
            sources = [(tile, path_of(tile)) for tile in zone_tiles if path_of(tile).exists()]
            if sources:
                written.append(write_vrt(sources, results.mosaic(layer, year, epsg)))
    if not written:
        raise UserError(f"{results.root}: no tile COG or quicklook for {year} to mosaic: run the assemble rule first")
    return written


def write_mosaic_cog(vrt: Path, out: Path, threads: int) -> Path:
    """The mosaic as one Cloud-Optimized GeoTIFF (same grid and bands; overviews averaged), compressed
    by ``threads`` (the publish job's)."""
    with rasterio.open(vrt) as src:
        predictor = 3 if src.dtypes[0].startswith("float") else 2
    with atomic_path(out) as tmp:
        rasterio.shutil.copy(
            vrt, tmp, driver="COG", compress="DEFLATE", predictor=predictor, blocksize=256,
            overview_resampling="average", bigtiff="IF_SAFER", num_threads=str(threads),
        )
        check_raster_complete(tmp)
    return out
