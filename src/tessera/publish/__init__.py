"""The publish stage: a run's run-level products, made from the tiles the rule gives it.

In order (each reads what the one before wrote): the tiles' landmasks (the same for every year),
geotessera's sidecar and manifests (``manifest``), one PCA basis and every tile's quicklook (``quicklook``), per-zone mosaics of the
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
from tessera.layout import Results, TileFiles, WorkTile
from tessera.options import InferOptions
from tessera.period import Period, variant_of
from tessera.stack import Preprocessing
from tessera.models import family_entry

log = logging.getLogger(__name__)


def tiles_of_embeddings(results: Results, work_dir: Path,
                        embeddings: list[Path]) -> tuple[list[TileFiles], dict[tuple, dict], dict, dict]:
    """The result files of the tile-years whose embeddings are given; from each stack index (read
    once), their scene ids ({source collection: [scene ids]}) and preprocessing per (tile name, year);
    and each tile's work ROI mask."""
    from tessera.publish.stac import scene_ids_of_index

    tiles, scene_ids, preprocessing, roi_masks = [], {}, {}, {}
    for path in map(Path, embeddings):
        tile, year = results.tile_year_of(path)
        files, work = TileFiles.locate(results, Tile.from_name(tile), year), WorkTile.at(work_dir, year, tile)
        if not (files.embedding.exists() and files.scales.exists() and work.stack_index.exists()):
            raise UserError(f"tile {tile} {year} has no complete embedding in {results.root} or no stack index in "
                            f"{work_dir} (embedding, scales, stack.json): run its fetch and assemble jobs first")
        index = json.loads(work.stack_index.read_text())
        tiles.append(files)
        scene_ids[(tile, year)] = scene_ids_of_index(index)
        # With what older indexes lack; one that records none, or other choices, is refused in one line.
        preprocessing[(tile, year)] = Preprocessing.from_attrs(index.get("preprocessing"), work.stack_index).attrs()
        roi_masks[tile] = work.roi_mask
    return sorted(tiles, key=lambda f: (f.year, f.tile.name)), scene_ids, preprocessing, roi_masks


def publish(
    results: Results,
    work_dir: Path,
    embeddings: list[Path],
    *,
    family: str,
    variant: str,
    checkpoint: Path,
    source: str,
    mosaics: bool = True,
    mosaic_cog: bool = False,
    threads: int = 1,
    benchmarks_dir: Path | None = None,
    inference: InferOptions = InferOptions(),
) -> None:
    """Write every run-level product of the tile-years of ``embeddings`` (every year of the run) into
    ``results``; their intermediates are in ``work_dir``; ``inference`` holds the run's inference
    options, for the provenance (``InferOptions.PROVENANCE``). ``variant`` is the configured dataset
    variant: a period or an orbit filter in the stacks appends to it (``period.variant_of``)."""
    from tessera.publish.manifest import processing_record, write_landmasks, write_manifests, write_metadata
    from tessera.publish.mosaic import write_mosaic_cog, write_zone_mosaics
    from tessera.publish.quicklook import write_quicklooks
    from tessera.publish.report import write_report
    from tessera.publish.stac import write_stac
    from tessera.publish.zarr_store import write_zarr_store

    tiles, scene_ids, preprocessing, roi_masks = tiles_of_embeddings(results, work_dir, embeddings)
    processing = processing_record(family, preprocessing,
                                   {name: getattr(inference, name) for name in InferOptions.PROVENANCE})
    chosen = processing["preprocessing"]
    variant = variant_of(variant, Period.parse(chosen["period"]), chosen["s1_orbit_state"])
    log.info("dataset variant %s", variant)
    write_landmasks(tiles, roi_masks)
    write_manifests(results, tiles, family=family, variant=variant)
    write_metadata(results, family=family, variant=variant, checkpoint=checkpoint, source=source, tiles=tiles,
                   processing=processing)
    write_quicklooks(tiles, results, threads=threads)
    for year in sorted({files.year for files in tiles}) if mosaics else []:
        for vrt in write_zone_mosaics(results, [files.tile for files in tiles if files.year == year], year):
            log.info("wrote %s", vrt)
            if mosaic_cog:
                log.info("wrote %s", write_mosaic_cog(vrt, vrt.with_suffix(".tif"), threads))
    write_stac(results, tiles, family=family, checkpoint_sha256=sha256_file(checkpoint), source=source,
               variant=variant, scene_ids=scene_ids, processing=processing)
    write_zarr_store(results, tiles, dataset_version=family_entry(family).dataset_version)
    log.info("wrote %s", results.zarr_store)
    write_report(results, tiles, scene_ids=scene_ids, benchmarks_dir=benchmarks_dir)
