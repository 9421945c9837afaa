"""The run's tiles as one Zarr v3 store in the layout of geotessera's published ``tessera.zarr``.

geotessera (≥ 0.10, module ``geotessera.zarr``: ``init_store``, ``_create_zone_group``,
``_compute_zone_grid_from_landmask``, ``_tile_pixel_offset``) builds its store from a registry of
landmask and embedding tiles. Its builder needs that registry and zarr ≥ 3.3, so this module
writes the same layout and conventions from our tiles itself:

```
tessera.zarr/
    zarr.json                 root: geoemb: convention attributes (consolidated metadata)
    utm{zone:02d}/            one group per UTM zone; proj: and spatial: convention attributes
        embeddings            int8    (T, B, H, W)  chunks (1, B, 32, 32), shards (1, B, 4096, 4096)
        scales                float32 (T, H, W)     chunks (1, 32, 32), shards (1, 4096, 4096)
        time                  int32   (T,)          the years
        band                  int32   (B,)
        x                     float64 (W,)          pixel-centre eastings
        y                     float64 (H,)          pixel-centre northings (canonical: south minus 10,000 km)
```

A zone's grid is in its canonical northern CRS (EPSG 326zz; tiles south of the equator have their
northings shifted by -10,000,000 m onto one continuous axis), its origin the 10 m-snapped corner of
its tiles (floor west, ceil north) and its size padded to whole shards; a tile lands at whole-pixel
offsets ``floor((tile_west - origin_x) / 10)``, ``floor((origin_y - tile_north) / 10)``, as in
geotessera and our VRT mosaics, so a pixel sits where the tile's COG has it, moved by less than a
pixel onto the 10 m lattice. Values: ``embeddings * scales`` is the tile COG's float32 value.
Scales: finite = an embedding; +inf (the fill value) = no embedding. geotessera's NaN (water from
its landmask) is not used: like its ``use_landmask=False`` stores, the root says
``geoemb:landmask: false``. Where neighbouring tiles overlap (a pixel along cell edges) the tile
later in name order wins, and a tile's no-data never hides a neighbour's data (as the mosaics).
geotessera's build bookkeeping (stretch statistics, preview pyramid) is not written.
geotessera's own reader (``geotessera.store.GeoTesseraZarr``: ``open_zone``, ``sample_points``,
``read_region``; ``geotessera download --source zarr --store-url``) reads the store from its path;
tests/test_geotessera_current.py checks it against the COGs with geotessera 0.11.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from tessera import __version__
from tessera.grid import PIXEL_METRES, Tile, floor_pixels
from tessera.io import atomic_path
from tessera.layout import Results, TileFiles

SHARD_SIZE = 4096  # geotessera.zarr.SHARD_SIZE
INNER_CHUNK = 32  # geotessera.zarr.INNER_CHUNK
SOUTH_FALSE_NORTHING = 10_000_000.0
# The geoemb: convention's registration, as geotessera stamps it (geotessera.zarr.GEOEMB_CONVENTION).
GEOEMB_CONVENTION = {
    "uuid": "61c12cc5-0e28-4056-999a-480cf3fb7e4c",
    "name": "geoemb:",
    "description": "Geoembeddings convention for geospatial embedding arrays with model provenance",
    "spec_url": "https://github.com/geo-embeddings/embeddings-zarr-convention/blob/v1/README.md",
    "schema_url": "https://raw.githubusercontent.com/geo-embeddings/embeddings-zarr-convention/refs/tags/v1/schema.json",
}
SPATIAL_REVISION = "r3"  # the zarr-conventions revisions geotessera writes
PROJ_REVISION = "r3"


def zone_of(tile: Tile) -> int:
    return tile.epsg % 100


def canonical_north(tile: Tile) -> float:
    """The tile's top northing on its zone's continuous (northern) axis."""
    return tile.transform.f - (SOUTH_FALSE_NORTHING if tile.epsg >= 32700 else 0.0)



@dataclass(frozen=True)
class StoreZone:
    """One zone group's grid: a 10 m-snapped origin, a size in whole shards, each tile's offsets."""

    zone: int
    origin_x: float
    origin_y: float
    width: int
    height: int
    offsets: dict[str, tuple[int, int]]  # tile name -> (row_off, col_off)

    @classmethod
    def for_tiles(cls, zone: int, tiles: list[Tile]) -> StoreZone:
        origin_x = floor_pixels(min(t.transform.c for t in tiles)) * PIXEL_METRES
        origin_y = -floor_pixels(-max(canonical_north(t) for t in tiles)) * PIXEL_METRES
        offsets = {t.name: (floor_pixels(origin_y - canonical_north(t)), floor_pixels(t.transform.c - origin_x))
                   for t in tiles}
        height = max(offsets[t.name][0] + t.height for t in tiles)
        width = max(offsets[t.name][1] + t.width for t in tiles)
        return cls(zone, origin_x, origin_y, _whole_shards(width), _whole_shards(height), offsets)

    @property
    def group(self) -> str:
        return f"utm{self.zone:02d}"

    @property
    def transform(self) -> list[float]:
        return [PIXEL_METRES, 0.0, self.origin_x, 0.0, -PIXEL_METRES, self.origin_y]

    @property
    def bbox(self) -> list[float]:
        return [self.origin_x, self.origin_y - self.height * PIXEL_METRES,
                self.origin_x + self.width * PIXEL_METRES, self.origin_y]


def _whole_shards(pixels: int) -> int:
    return math.ceil(pixels / SHARD_SIZE) * SHARD_SIZE


def root_attributes(dims: int, dataset_version: str) -> dict:
    """The root's geoemb: attributes, as geotessera's ``init_store`` writes them."""
    return {
        "zarr_conventions": [GEOEMB_CONVENTION],
        "geoemb:type": "pixel",
        "geoemb:dimensions": dims,
        "geoemb:model": f"https://geotessera.org/model/{dataset_version}",
        "geoemb:source_data": [
            "https://sentinel.esa.int/web/sentinel/missions/sentinel-1",
            "https://sentinel.esa.int/web/sentinel/missions/sentinel-2",
        ],
        "geoemb:data_type": "int8",
        "geoemb:gsd": PIXEL_METRES,
        "geoemb:spatial_layout": "utm_zones",
        "geoemb:build_version": f"tessera-workflow {__version__}",
        "geoemb:quantization": {
            "method": "per_pixel_scale",
            "original_dtype": "float32",
            "quantized_dtype": "int8",
            "scale": {"type": "array", "array_name": "scales", "nodata": "+inf"},
        },
        "geoemb:landmask": False,
    }


def zone_attributes(zone: StoreZone) -> dict:
    """A zone group's proj: and spatial: convention attributes (with their registrations)."""
    from zarr_cm import create_many, proj, spatial

    return create_many({
        "spatial": spatial.create(revision=SPATIAL_REVISION, dimensions=["y", "x"], bbox=zone.bbox,
                                  transform_type="affine", transform=zone.transform, shape=[zone.height, zone.width],
                                  registration="pixel"),
        "proj": proj.create(revision=PROJ_REVISION, code=f"EPSG:{32600 + zone.zone}"),
    })


def _create_zone(root, zone: StoreZone, years: list[int], dims: int):
    from zarr.codecs import BloscCodec

    compressors = BloscCodec(cname="zstd", clevel=3)
    group = root.create_group(zone.group)
    shape = (len(years), zone.height, zone.width)
    group.create_array("embeddings", shape=(len(years), dims, *shape[1:]), dtype=np.int8, fill_value=np.int8(0),
                       chunks=(1, dims, INNER_CHUNK, INNER_CHUNK), shards=(1, dims, SHARD_SIZE, SHARD_SIZE),
                       compressors=compressors, dimension_names=["time", "band", "y", "x"])
    group.create_array("scales", shape=shape, dtype=np.float32, fill_value=np.float32("inf"),
                       chunks=(1, INNER_CHUNK, INNER_CHUNK), shards=(1, SHARD_SIZE, SHARD_SIZE),
                       compressors=compressors, dimension_names=["time", "y", "x"])
    coordinates = {
        "x": zone.origin_x + (np.arange(zone.width) + 0.5) * PIXEL_METRES,
        "y": zone.origin_y - (np.arange(zone.height) + 0.5) * PIXEL_METRES,
        "time": np.array(years, dtype=np.int32),
        "band": np.arange(dims, dtype=np.int32),
    }
    for name, values in coordinates.items():
        array = group.create_array(name, shape=values.shape, dtype=values.dtype, fill_value=0,
                                   compressors=compressors, dimension_names=[name])
        array[:] = values
    group.attrs.update(zone_attributes(zone))
    return group


def _write_tile(group, zone: StoreZone, files: TileFiles, t: int) -> None:
    """Place one tile's codes and scales; pixels without an embedding keep what is there."""
    codes = np.load(files.embedding, mmap_mode="r")
    scales = np.load(files.scales)
    valid = np.isfinite(scales)
    if not valid.any():
        return
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    row_off, col_off = zone.offsets[files.tile.name]
    region = (slice(row_off + r0, row_off + r1), slice(col_off + c0, col_off + c1))
    mask = valid[r0:r1, c0:c1]
    old_scales = group["scales"][(t, *region)]
    old_codes = group["embeddings"][(t, slice(None), *region)]
    new_codes = np.moveaxis(np.asarray(codes[r0:r1, c0:c1]), -1, 0)
    group["scales"][(t, *region)] = np.where(mask, scales[r0:r1, c0:c1], old_scales)
    group["embeddings"][(t, slice(None), *region)] = np.where(mask[None], new_codes, old_codes)


def write_zarr_store(results: Results, tiles: list[TileFiles], *, dataset_version: str) -> None:
    """``results.zarr_store``: every tile-year of ``tiles`` in geotessera's Zarr store layout."""
    import zarr

    years = sorted({files.year for files in tiles})
    dims = np.load(tiles[0].embedding, mmap_mode="r").shape[-1]
    by_zone = sorted(tiles, key=lambda f: (zone_of(f.tile), f.tile.name, f.year))
    with atomic_path(results.zarr_store, directory=True) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update(root_attributes(dims, dataset_version))
        for zone_number, zone_files in groupby(by_zone, key=lambda f: zone_of(f.tile)):
            zone_files = list(zone_files)
            zone = StoreZone.for_tiles(zone_number, list({f.tile.name: f.tile for f in zone_files}.values()))
            group = _create_zone(root, zone, years, dims)
            for files in zone_files:  # name order: where tiles overlap, the later one wins
                _write_tile(group, zone, files, years.index(files.year))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata")
            zarr.consolidate_metadata(str(tmp))
