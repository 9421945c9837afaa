"""geotessera's local dataset layout: tile files, the sidecar and the GeoParquet manifests.

```
{out}/tessera_metadata.json
{out}/manifest.parquet          one row per tile-year, read by geotessera 0.9+
{out}/registry.parquet          the same rows as GeoParquet, read by geotessera 0.6–0.8
{out}/landmasks.parquet         one row per landmask
{out}/global_0.1_degree_representation/{year}/grid_X_Y/{grid_X_Y.npy, grid_X_Y_scales.npy, SHA256}
{out}/global_0.1_degree_tiff_all/grid_X_Y.tiff       landmask (flat)
```
A tile counts as present only when its embedding, scales and landmask all exist.

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
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from tessera import __version__
from tessera.grid import Tile
from tessera.io import atomic_path, sha256_file

# geotessera's dataset versions by model family (tessera_metadata.json "dataset_version").
DATASET_VERSIONS = {"v1.0": "1.0", "v1.0-qat": "1.0", "v1.1": "1.1", "v2": "2.0"}
EMBEDDINGS_DIR = "global_0.1_degree_representation"
LANDMASKS_DIR = "global_0.1_degree_tiff_all"


@dataclass(frozen=True)
class TileFiles:
    tile: Tile
    year: int
    embedding: Path
    scales: Path
    landmask: Path
    checksums: Path

    @classmethod
    def locate(cls, output_dir: Path, tile: Tile, year: int) -> "TileFiles":
        folder = output_dir / EMBEDDINGS_DIR / str(year) / tile.name
        return cls(tile, year, folder / f"{tile.name}.npy", folder / f"{tile.name}_scales.npy",
                   output_dir / LANDMASKS_DIR / f"{tile.name}.tiff", folder / "SHA256")

    @property
    def present(self) -> bool:
        return self.embedding.exists() and self.scales.exists() and self.landmask.exists()


def find_tiles(output_dir: Path) -> list[TileFiles]:
    """Every tile-year folder under the embeddings directory (present or not)."""
    found = []
    for folder in sorted((output_dir / EMBEDDINGS_DIR).glob("[0-9][0-9][0-9][0-9]/grid_*")):
        found.append(TileFiles.locate(output_dir, Tile.from_name(folder.name), int(folder.parent.name)))
    return found


def write_metadata(
    out: Path, *, family: str, variant: str, checkpoint: Path, source: str, year: int, embeddings: list[Path]
) -> None:
    """geotessera's dataset sidecar, plus what made the embeddings (provenance)."""
    version = DATASET_VERSIONS[family]
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
        "years": [year],
        "tiles": sorted(p.stem for p in embeddings),
    }
    with atomic_path(out) as tmp:
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


def write_manifests(output_dir: Path, *, family: str, variant: str) -> list[TileFiles]:
    """manifest.parquet + registry.parquet (tiles) and landmasks.parquet for the present tiles.

    ``family`` and ``variant`` fill the ``version``/``variant`` columns, as in tessera_metadata.json.
    """
    tiles = [t for t in find_tiles(output_dir) if t.present]
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
    columns = {"version": pa.array([DATASET_VERSIONS[family]] * len(tiles), pa.string()),
               "variant": pa.array([variant] * len(tiles), pa.string()), **columns}
    with atomic_path(output_dir / "manifest.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
    with atomic_path(output_dir / "registry.parquet") as tmp:
        pq.write_table(_geoparquet(columns, [shapely.Point(t.tile.lon, t.tile.lat) for t in tiles]), tmp)

    landmasks = {t.tile.name: t for t in tiles}.values()
    mask_columns = {
        "lat": pa.array([t.tile.lat for t in landmasks]), "lon": pa.array([t.tile.lon for t in landmasks]),
        "lon_i": pa.array([round(t.tile.lon * 100) for t in landmasks], pa.int32()),
        "lat_i": pa.array([round(t.tile.lat * 100) for t in landmasks], pa.int32()),
        "file_size": pa.array([t.landmask.stat().st_size for t in landmasks]),
        "hash": pa.array([sha256_file(t.landmask) for t in landmasks]),
    }
    with atomic_path(output_dir / "landmasks.parquet") as tmp:
        pq.write_table(_geoparquet(mask_columns, [shapely.Point(t.tile.lon, t.tile.lat) for t in landmasks]), tmp)
    return tiles
