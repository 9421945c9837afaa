"""STAC metadata for an output directory: one Collection, one Item per tile-year.

```
{out}/stac/collection.json
{out}/stac/{tile}_{year}/{tile}_{year}.json     assets point at the tile files with relative hrefs
```
The catalog is self-contained: copy or move the output directory and it stays valid.

Items follow STAC 1.1: ``datetime`` null with ``start_datetime``/``end_datetime`` spanning the
calendar year, or the run's period of it (config ``period``); geometry and bbox of the 0.1° cell in WGS84; the tile's pixel grid in the projection
extension v2 (``proj:code``, ``proj:shape``, ``proj:transform``, ``proj:bbox``); band and no-data
metadata as STAC 1.1 common metadata (``bands``, ``nodata``, ``data_type`` on each asset), which the
core schemas validate without the network; ``file:checksum`` (sha256 multihash) and ``file:size`` per
asset; provenance in the processing extension (software; the lineage names the choices that change
the numbers) and ``tessera:`` fields (model family, checkpoint sha256, data source, variant, scene ids
per collection, ``tessera:preprocessing`` and ``tessera:inference`` as in tessera_metadata.json).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pystac
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from shapely import box
from shapely.geometry import mapping

from tessera import __version__
from tessera.errors import UserError
from tessera.grid import PIXEL_METRES
from tessera.io import atomic_path, sha256_file
from tessera.layout import Results, TileFiles
from tessera.period import WHOLE_YEAR, Period, describe

PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
# Names of the source collections in the scene-id mapping, as Planetary Computer names them.
S2_COLLECTION = "sentinel-2-l2a"
S1_COLLECTION = "sentinel-1-rtc"
# multihash prefix of a sha2-256 digest: function code 0x12, digest length 0x20 (32 bytes).
_SHA256_MULTIHASH = "1220"


def scene_ids_of_index(index: dict) -> dict[str, list[str]]:
    """The scene ids a tile's embeddings were made from, per collection, from its parsed ``stack.json``."""
    s2 = [scene for step in index["s2"]["scenes"] for scene in step]
    s1 = [scene for orbit in ("ascending", "descending") for step in index["s1"][orbit]["scenes"] for scene in step]
    return {S2_COLLECTION: sorted(s2), S1_COLLECTION: sorted(s1)}


def _span(period: Period, year: int) -> tuple[dt.datetime, dt.datetime]:
    """The first and last second (UTC) of the period of a year."""
    dates = period.dates(year)
    return dates.start, dates.end.replace(microsecond=0)


def _lineage(processing: dict) -> str:
    """The choices that change the numbers, in words."""
    pre, run = processing["preprocessing"], processing["inference"]
    return (f"time series of {describe(Period.parse(pre['period']), pre['s1_orbit_state'])}; Sentinel-2 resampled with {pre.get('s2_resampling')}, harmonisation {pre.get('harmonisation')}, "
            f"OPERA layover/shadow pixels {pre.get('s1_layover')}, same-date granules merged in "
            f"{pre.get('granule_order')} order; inference precision {run['precision_in_effect']}, seed {run['seed']}, "
            f"{run['repeat_times']} draw(s) per pixel")


def _file_fields(asset: pystac.Asset, path: Path) -> None:
    FileExtension.ext(asset).apply(checksum=_SHA256_MULTIHASH + sha256_file(path), size=path.stat().st_size)


def _embedding_bands(dims: int) -> list[dict]:
    # The same band names as the COG's band descriptions and geotessera's GeoTIFF exports.
    return [{"name": f"Tessera_Band_{i}"} for i in range(dims)]


def _tile_assets(files: TileFiles, results: Results) -> dict[str, pystac.Asset]:
    codes = np.load(files.embedding, mmap_mode="r")
    dims = codes.shape[-1]
    assets = {
        "embeddings": pystac.Asset(
            str(files.embedding), title="Embeddings, int8 codes (H, W, D)", media_type="application/x-npy",
            roles=["data"],
            description="Dequantise with codes.astype('float32') * scales[..., None] (geotessera.dequantize_embedding).",
            extra_fields={"data_type": "int8", "bands": _embedding_bands(dims)},
        ),
        "scales": pystac.Asset(
            str(files.scales), title="Per-pixel float32 scales (H, W); NaN = no embedding",
            media_type="application/x-npy", roles=["data"], extra_fields={"data_type": "float32", "nodata": "nan"},
        ),
        "landmask": pystac.Asset(
            str(files.landmask), title="Mask: 1 where the tile has (or should have) embeddings",
            media_type=pystac.MediaType.GEOTIFF, roles=["data-mask"], extra_fields={"data_type": "uint8"},
        ),
    }
    cog = results.cog(files.tile.name, files.year)
    if cog.exists():
        assets["cog"] = pystac.Asset(
            str(cog), title="Dequantised float32 embeddings", media_type=pystac.MediaType.COG, roles=["data"],
            extra_fields={"data_type": "float32", "nodata": "nan", "bands": _embedding_bands(dims)},
        )
    png, rgb_cog = results.quicklook(files.tile.name, files.year)
    if png.exists():
        assets["thumbnail"] = pystac.Asset(str(png), title="PCA quicklook", media_type=pystac.MediaType.PNG,
                                           roles=["thumbnail"])
    if rgb_cog.exists():
        assets["overview"] = pystac.Asset(
            str(rgb_cog), title="PCA quicklook (RGB + alpha)", media_type=pystac.MediaType.COG, roles=["overview"],
            extra_fields={"data_type": "uint8", "bands": [{"name": n} for n in ("red", "green", "blue", "alpha")]},
        )
    for asset in assets.values():
        _file_fields(asset, Path(asset.href))
    return assets


def _tile_item(files: TileFiles, results: Results, provenance: dict, start: dt.datetime, end: dt.datetime) -> pystac.Item:
    tile = files.tile
    cell = box(*tile.bounds_lonlat)
    item = pystac.Item(
        id=f"{tile.name}_{files.year}", geometry=mapping(cell), bbox=list(cell.bounds), datetime=None,
        start_datetime=start, end_datetime=end,
        properties={"gsd": PIXEL_METRES, **provenance},
    )
    west, north = tile.transform.c, tile.transform.f
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=f"EPSG:{tile.epsg}", shape=[tile.height, tile.width], transform=list(tile.transform)[:6],
        bbox=[west, north - tile.height * PIXEL_METRES, west + tile.width * PIXEL_METRES, north],
    )
    FileExtension.add_to(item)
    item.stac_extensions.append(PROCESSING_SCHEMA)
    for key, asset in _tile_assets(files, results).items():
        item.add_asset(key, asset)
    return item


def write_stac(
    results: Results,
    tiles: list[TileFiles],
    *,
    family: str,
    checkpoint_sha256: str,
    source: str,
    variant: str,
    scene_ids: dict[str, dict[str, list[str]]],
    software_version: str = __version__,
    license: str = "other",
    processing: dict | None = None,
) -> Path:
    """Write ``stac/`` of an output directory for ``tiles`` and return the path of collection.json.

    ``scene_ids`` maps each (tile name, year) to {source collection: [scene ids]} (see
    ``scene_ids_of_index``). The previous ``stac/`` folder is replaced atomically.
    """
    results = Results(results.root.absolute())  # asset hrefs start absolute, then are made relative
    tiles = [TileFiles.locate(results, files.tile, files.year) for files in tiles if files.present]
    if not tiles:
        raise UserError(f"{results.root}: no complete tile (embedding, scales and landmask): run the workflow first")
    missing = sorted(f"{files.tile.name} {files.year}" for files in tiles if (files.tile.name, files.year) not in scene_ids)
    if missing:
        raise UserError(f"no scene ids for tile-year(s) {', '.join(missing)}: pass the stack.json of every tile-year")
    years = sorted({files.year for files in tiles})
    period = WHOLE_YEAR if processing is None else Period.parse(processing["preprocessing"]["period"])
    start, end = _span(period, years[0])[0], _span(period, years[-1])[1]
    named = str(years[0]) if len(years) == 1 else f"{years[0]}-{years[-1]}"
    common = {
        "processing:software": {"tessera-workflow": software_version},
        "processing:lineage": "Sentinel-2 L2A and Sentinel-1 RTC time series of the year, encoded as the TESSERA "
                              "reference pipeline does, embedded per pixel, quantised to int8 with per-pixel scales",
        "tessera:model_family": family,
        "tessera:checkpoint_sha256": checkpoint_sha256,
        "tessera:data_source": source,
        "tessera:variant": variant,
    }
    if processing is not None:  # publish.manifest.processing_record
        common["processing:lineage"] += "; " + _lineage(processing)
        common["tessera:preprocessing"] = processing["preprocessing"]
        common["tessera:preprocessing_as_trained"] = processing["preprocessing_as_trained"]
        common["tessera:inference"] = processing["inference"]
    bounds = np.array([files.tile.bounds_lonlat for files in tiles])
    collection = pystac.Collection(
        id=f"tessera-{variant}-{named}",
        title=f"TESSERA embeddings {named} ({family}, {variant})",
        description="Per-pixel TESSERA embeddings (10 m, one vector per pixel summarising a year of Sentinel-1 "
                    "and Sentinel-2) on geotessera's 0.1° grid, made by tessera-workflow.",
        extent=pystac.Extent(
            pystac.SpatialExtent([[*bounds[:, :2].min(axis=0).tolist(), *bounds[:, 2:].max(axis=0).tolist()]]),
            pystac.TemporalExtent([[start, end]]),
        ),
        license=license,
        extra_fields={k: v for k, v in common.items() if k.startswith("tessera:")},
    )
    for files in tiles:
        provenance = {**common, "tessera:scenes": scene_ids[(files.tile.name, files.year)]}
        collection.add_item(_tile_item(files, results, provenance, *_span(period, files.year)))

    final = results.stac
    collection.normalize_hrefs(str(final.absolute()))
    collection.make_all_asset_hrefs_relative()
    with atomic_path(final, directory=True) as tmp:
        collection.save(pystac.CatalogType.SELF_CONTAINED, dest_href=str(tmp.absolute()))
    return final / "collection.json"
