"""The publish stage: a run's run-level products, made from the tiles the rule gives it.

In order (each reads what the one before wrote): the tiles' landmasks (the same for every year),
geotessera's sidecar and manifests (``manifest``), one PCA basis and every tile's quicklook (``quicklook``), per-zone mosaics of the
tile COGs and quicklooks (``mosaic``), the STAC catalogue (``stac``) and the HTML report
(``report``). ``verify`` checks any output directory, whatever made it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tessera.errors import UserError
from tessera.grid import Tile
from tessera.io import sha256_file
from tessera.layout import Results, TileFiles, WorkTile

log = logging.getLogger(__name__)


def tiles_of_stacks(results: Results, stack_indexes: list[Path]) -> tuple[list[TileFiles], dict[tuple, dict], dict]:
    """The result files of the tile-years whose ``stack.json`` are given, their scene ids per
    (tile name, year) ({source collection: [scene ids]}), and each tile's work ROI mask."""
    from tessera.publish.stac import scene_ids_from_stack_index

    tiles, scene_ids, roi_masks = [], {}, {}
    for path in map(Path, stack_indexes):
        index = json.loads(path.read_text())
        files = TileFiles.locate(results, Tile.from_name(index["tile"]), int(index["year"]))
        if not (files.embedding.exists() and files.scales.exists()):
            raise UserError(f"tile {files.tile.name} {files.year} has no complete embedding in {results.root} "
                            "(embedding and scales): run its assemble job first")
        tiles.append(files)
        scene_ids[(files.tile.name, files.year)] = scene_ids_from_stack_index(path)
        roi_masks[files.tile.name] = WorkTile(path.parent).roi_mask
    return sorted(tiles, key=lambda f: (f.year, f.tile.name)), scene_ids, roi_masks


def publish(
    results: Results,
    stack_indexes: list[Path],
    *,
    family: str,
    variant: str,
    checkpoint: Path,
    source: str,
    mosaics: bool = True,
    mosaic_cog: bool = False,
    threads: int = 1,
    benchmarks_dir: Path | None = None,
) -> None:
    """Write every run-level product of the tile-years of ``stack_indexes`` (every year of the run)
    into ``results``."""
    from tessera.publish.manifest import write_landmasks, write_manifests, write_metadata
    from tessera.publish.mosaic import write_mosaic_cog, write_zone_mosaics
    from tessera.publish.quicklook import write_quicklooks
    from tessera.publish.report import write_report
    from tessera.publish.stac import write_stac

    tiles, scene_ids, roi_masks = tiles_of_stacks(results, stack_indexes)
    write_landmasks(tiles, roi_masks)
    write_manifests(results, tiles, family=family, variant=variant)
    write_metadata(results, family=family, variant=variant, checkpoint=checkpoint, source=source, tiles=tiles)
    write_quicklooks(tiles, results, threads=threads)
    for year in sorted({files.year for files in tiles}) if mosaics else []:
        for vrt in write_zone_mosaics(results, [files.tile for files in tiles if files.year == year], year):
            log.info("wrote %s", vrt)
            if mosaic_cog:
                log.info("wrote %s", write_mosaic_cog(vrt, vrt.with_suffix(".tif")))
    write_stac(results, tiles, family=family, checkpoint_sha256=sha256_file(checkpoint), source=source,
               variant=variant, scene_ids=scene_ids)
    write_report(results, tiles, scene_ids=scene_ids, benchmarks_dir=benchmarks_dir)
