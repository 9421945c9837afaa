"""The publish stage: a run's run-level products, made from the tiles the rule gives it.

In order (each reads what the one before wrote): geotessera's sidecar and manifests
(``manifest``), one PCA basis and every tile's quicklook (``quicklook``), per-zone mosaics of the
tile COGs and quicklooks (``mosaic``), the STAC catalogue (``stac``) and the HTML report
(``report``), and the Zarr store in geotessera's layout (``zarr_store``). ``verify`` checks any output directory, whatever made it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tessera.errors import UserError
from tessera.grid import Tile
from tessera.io import sha256_file
from tessera.layout import Results, TileFiles
from tessera.models import family_entry

log = logging.getLogger(__name__)


def tiles_of_stacks(results: Results, stack_indexes: list[Path]) -> tuple[list[TileFiles], dict[str, dict[str, list[str]]]]:
    """The result files of the tile-years whose ``stack.json`` are given, and their scene ids per tile."""
    from tessera.publish.stac import scene_ids_from_stack_index

    tiles, scene_ids = [], {}
    for path in stack_indexes:
        index = json.loads(Path(path).read_text())
        files = TileFiles.locate(results, Tile.from_name(index["tile"]), int(index["year"]))
        if not files.present:
            raise UserError(f"tile {files.tile.name} {files.year} has no complete embedding in {results.root} "
                            "(embedding, scales and landmask): run its assemble job first")
        tiles.append(files)
        scene_ids[files.tile.name] = scene_ids_from_stack_index(Path(path))
    return sorted(tiles, key=lambda f: (f.year, f.tile.name)), scene_ids


def publish(
    results: Results,
    stack_indexes: list[Path],
    *,
    year: int,
    family: str,
    variant: str,
    checkpoint: Path,
    source: str,
    mosaics: bool = True,
    mosaic_cog: bool = False,
    threads: int = 1,
    benchmarks_dir: Path | None = None,
) -> None:
    """Write every run-level product of the tiles of ``stack_indexes`` into ``results``."""
    from tessera.publish.manifest import write_manifests, write_metadata
    from tessera.publish.mosaic import write_mosaic_cog, write_zone_mosaics
    from tessera.publish.quicklook import write_quicklooks
    from tessera.publish.report import write_report
    from tessera.publish.stac import write_stac
    from tessera.publish.zarr_store import write_zarr_store

    tiles, scene_ids = tiles_of_stacks(results, stack_indexes)
    write_manifests(results, tiles)
    write_metadata(results, family=family, variant=variant, checkpoint=checkpoint, source=source, year=year,
                   tiles=tiles)
    write_quicklooks(tiles, results, year, threads=threads)
    if mosaics:
        for vrt in write_zone_mosaics(results, [files.tile for files in tiles], year):
            log.info("wrote %s", vrt)
            if mosaic_cog:
                log.info("wrote %s", write_mosaic_cog(vrt, vrt.with_suffix(".tif")))
    write_stac(results, tiles, year=year, family=family, checkpoint_sha256=sha256_file(checkpoint), source=source,
               variant=variant, scene_ids=scene_ids)
    write_zarr_store(results, tiles, dataset_version=family_entry(family).dataset_version)
    log.info("wrote %s", results.zarr_store)
    write_report(results, tiles, year, scene_ids=scene_ids, benchmarks_dir=benchmarks_dir)
