"""geotessera's registry of an output directory: the sidecar and the GeoParquet manifests.

```
{out}/tessera_metadata.json
{out}/manifest.parquet          one row per tile-year, read by geotessera 0.9+
{out}/registry.parquet          the same rows as GeoParquet, read by geotessera 0.6–0.8
{out}/landmasks.parquet         one row per landmask
```
The tile files themselves: ``tessera.layout.Results``.

The manifests follow what each geotessera reads. 0.9+ (``Registry._load_registry``) reads
manifest.parquet with pandas, keeps the rows whose ``version``/``variant`` columns match the dataset
asked for, and builds the point geometry from ``lon``/``lat`` itself: a WKB ``geometry`` column there
breaks it, so manifest.parquet has none (as geotessera's own ``s3scan`` writes it). 0.6–0.8 read
registry.parquet with ``geopandas.read_parquet`` and require its GeoParquet geometry. Both read
landmasks.parquet with pandas (``lon``, ``lat``, ``file_size``); it stays GeoParquet.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from tessera import __version__
from tessera.errors import UserError
from tessera.io import atomic_path, sha256_file
from tessera.layout import Results, TileFiles
from tessera.models import family_entry


def processing_record(family: str, preprocessing: dict[tuple, dict], inference: dict) -> dict:
    """What changes the numbers of a run's embeddings: the stacks' preprocessing (one for the run:
    ``preprocessing`` maps (tile, year) to their stack.json's), whether it is what the family was
    trained on, and how inference ran (``inference``: device, precision, seed, repeat_times)."""
    from tessera.models import expected_preprocessing, get_family
    from tessera.models.engine import precision_in_effect

    kinds = {json.dumps(choices, sort_keys=True) for choices in preprocessing.values()}
    if len(kinds) > 1:
        raise UserError(f"the tiles' stacks were fetched with different preprocessing ({'; '.join(sorted(kinds))}): "
                        "rerun the fetch of the tiles with the run's fetch options, then publish")
    choices = dict(next(iter(preprocessing.values()), {}))
    expected = expected_preprocessing(family)
    return {
        "preprocessing": choices,
        "preprocessing_as_trained": all(choices.get(key) == value for key, value in expected.items()),
        "inference": {**inference, "precision_in_effect": precision_in_effect(inference["precision"], get_family(family),
                                                                              inference["device"])},
    }


def write_metadata(
    results: Results, *, family: str, variant: str, checkpoint: Path, source: str, tiles: list[TileFiles],
    processing: dict | None = None,
) -> None:
    """geotessera's dataset sidecar, plus what made the embeddings (provenance; ``processing`` from
    :func:`processing_record`)."""
    version = family_entry(family).dataset_version
    sidecar = {
        "dataset_version": version,
        "dataset_version_path": f"v{version}",
        "dataset_variant": variant,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generator": f"tessera-workflow {__version__}",
        "model_family": family,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "data_source": source,
        "years": sorted({t.year for t in tiles}),
        "tiles": sorted({t.tile.name for t in tiles}),
    }
    if processing is not None:
        sidecar["processing"] = processing
    with atomic_path(results.metadata) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")


def _geoparquet(columns: dict[str, list], points: list[shapely.Point]) -> pa.Table:
    """A GeoParquet table (WKB point geometry in WGS84) that geopandas and geotessera accept."""
    table = pa.table({**columns, "geometry": pa.array(shapely.to_wkb(points).tolist(), pa.binary())})
    geo = {
        "version": "1.0.0",
        "primary_column": "geometry",
        "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Point"], "bbox": list(shapely.MultiPoint(points).bounds)}},
    }
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"geo": json.dumps(geo).encode()})


def _read_checksums(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {name: digest for digest, name in (line.split() for line in path.read_text().splitlines() if line.strip())}


def write_landmasks(tiles: list[TileFiles], roi_masks: dict[str, Path]) -> None:
    """Each tile's landmask: its ROI mask on the tile grid (1 where the tile has, or should have,
    embeddings), the same for every year, so written once per tile from ``roi_masks`` (tile name ->
    a work ROI mask of the tile)."""
    for files in {t.tile.name: t for t in tiles}.values():
        with atomic_path(files.landmask) as tmp:
            shutil.copyfile(roi_masks[files.tile.name], tmp)


def write_manifests(results: Results, tiles: list[TileFiles], *, family: str, variant: str) -> None:
    """manifest.parquet + registry.parquet (tile-years) and landmasks.parquet (tiles) of ``tiles``.

    ``family`` and ``variant`` fill the ``version``/``variant`` columns, as in tessera_metadata.json.
    """
    rows: dict[str, list] = {k: [] for k in ["year", "lon", "lat", "lon_i", "lat_i", "grid_size", "scales_size",
                                              "file_size", "hash", "scales_hash"]}
    for t in tiles:
        sums = _read_checksums(t.checksums)
        rows["year"].append(t.year)
        rows["lon"].append(t.tile.lon)
        rows["lat"].append(t.tile.lat)
        rows["lon_i"].append(round(t.tile.lon * 100))
        rows["lat_i"].append(round(t.tile.lat * 100))
        rows["grid_size"].append(t.embedding.stat().st_size)
        rows["scales_size"].append(t.scales.stat().st_size)
        rows["file_size"].append(t.embedding.stat().st_size)
        rows["hash"].append(sums.get(t.embedding.name) or sha256_file(t.embedding))
        rows["scales_hash"].append(sums.get(t.scales.name) or sha256_file(t.scales))
    types = {"year": pa.int32(), "lon_i": pa.int32(), "lat_i": pa.int32()}
    columns = {k: pa.array(v, types.get(k)) for k, v in rows.items()}
    columns = {"version": pa.array([family_entry(family).dataset_version] * len(tiles), pa.string()),
               "variant": pa.array([variant] * len(tiles), pa.string()), **columns}
    with atomic_path(results.manifest) as tmp:
        pq.write_table(pa.table(columns), tmp)
    with atomic_path(results.registry) as tmp:
        pq.write_table(_geoparquet(columns, [shapely.Point(t.tile.lon, t.tile.lat) for t in tiles]), tmp)

    landmasks = {t.tile.name: t for t in tiles}.values()
    mask_columns = {
        "lat": pa.array([t.tile.lat for t in landmasks]), "lon": pa.array([t.tile.lon for t in landmasks]),
        "lon_i": pa.array([round(t.tile.lon * 100) for t in landmasks], pa.int32()),
        "lat_i": pa.array([round(t.tile.lat * 100) for t in landmasks], pa.int32()),
        "file_size": pa.array([t.landmask.stat().st_size for t in landmasks]),
        "hash": pa.array([sha256_file(t.landmask) for t in landmasks]),
    }
    with atomic_path(results.landmasks_manifest) as tmp:
        pq.write_table(_geoparquet(mask_columns, [shapely.Point(t.tile.lon, t.tile.lat) for t in landmasks]), tmp)
