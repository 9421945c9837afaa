"""The stage sub-commands, one per rule file: download, fetch, infer, assemble, publish, demo.

Each takes the work and output directories (not file paths): ``tessera.layout`` names every file
of a tile-year, for the rules and for this code alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rasterio.windows import Window

from tessera import layout
from tessera.errors import UserError
from tessera.options import FetchOptions, InferOptions


def window_arg(text: str) -> Window:
    """A pixel window written as col_off,row_off,width,height."""
    try:
        col, row, width, height = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not col_off,row_off,width,height") from None
    return Window(col, row, width, height)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def _tile_year(p: argparse.ArgumentParser, *, output_dir: bool = True) -> None:
    p.add_argument("--tile", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--work-dir", required=True, help="the config's work_dir")
    if output_dir:
        p.add_argument("--output-dir", required=True, help="the config's output_dir")


def _tile_plan(args: argparse.Namespace):
    """The tile's work window and patches, computed as the Snakefile's plan computes them."""
    from tessera.grid import Tile
    from tessera.plan import plan_tile
    from tessera.roi import read_roi

    plan = plan_tile(read_roi(args.roi), Tile.from_name(args.tile), args.patch_size)
    if plan is None:
        raise UserError(f"roi {args.roi!r} touches no pixel of tile {args.tile}: give a tile of this ROI's plan "
                        "(tessera plan)")
    return plan


def cmd_fetch(args: argparse.Namespace) -> None:
    from tessera.fetch import fetch_tile

    plan = _tile_plan(args)
    source = {"name": args.source, **json.loads(args.source_options or "{}")}
    fetch_tile(plan.tile, plan.window, args.year, args.roi, source,
               layout.WorkTile.at(args.work_dir, args.year, args.tile),
               layout.Results(args.output_dir).observations(args.tile, args.year),
               options=FetchOptions.from_args(args), demo_catalog=layout.demo_catalog(args.work_dir, args.year))


def add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="(rule fetch) a tile's ROI mask, S2 and S1 stacks, stack index and observation counts")
    _tile_year(p)
    p.add_argument("--roi", required=True, help="the config's roi")
    p.add_argument("--source", required=True)
    p.add_argument("--source-options", help="JSON options of source stac (the config's stac mapping)")
    FetchOptions.add_arguments(p)
    p.set_defaults(func=cmd_fetch)


def cmd_infer(args: argparse.Namespace) -> None:
    from tessera.infer import infer_patches

    plan = _tile_plan(args)
    unknown = sorted(set(args.patch or ()) - {layout.patch_name(p) for p in plan.patches})
    if unknown:
        raise UserError(f"tile {args.tile} has no patch {', '.join(unknown)} for this ROI and patch size: "
                        f"give one of {', '.join(layout.patch_name(p) for p in plan.patches)}")
    patches = [p for p in plan.patches if not args.patch or layout.patch_name(p) in args.patch]
    work = layout.WorkTile.at(args.work_dir, args.year, args.tile)
    infer_patches(work.stack_index, patches, roi_mask_path=work.roi_mask, checkpoint=Path(args.checkpoint),
                  family=args.family, options=InferOptions.from_args(args), out_dir=work.patches)


def add_infer(sub) -> None:
    p = sub.add_parser("infer", help="(rule infer) embed patches of a tile's stack")
    _tile_year(p, output_dir=False)
    p.add_argument("--roi", required=True, help="the config's roi")
    p.add_argument("--patch-size", type=int, required=True, help="the config's patch_size")
    p.add_argument("--patch", action="append", metavar="rROW_cCOL",
                   help="embed only this patch (repeat for several; default: every patch of the tile)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--family")
    InferOptions.add_arguments(p)
    p.set_defaults(func=cmd_infer)


def cmd_assemble(args: argparse.Namespace) -> None:
    from tessera.assemble import assemble_tile
    from tessera.grid import Tile

    if args.cog and not (args.checkpoint and args.source):
        raise UserError("assemble --cog records the checkpoint and data source in the COG: give --checkpoint and --source")
    assemble_tile(
        Tile.from_name(args.tile), args.year, layout.patch_files(args.patches), family=args.family,
        work=layout.WorkTile.at(args.work_dir, args.year, args.tile), results=layout.Results(args.output_dir),
        dims=args.dims, float32=args.float32, cog=args.cog, checkpoint=args.checkpoint and Path(args.checkpoint),
        source=args.source, threads=args.threads,
    )


def add_assemble(sub) -> None:
    p = sub.add_parser("assemble", help="(rule assemble) patches -> int8 tile + scales in geotessera's layout, "
                       "and the tile's COG")
    _tile_year(p)
    p.add_argument("--family", required=True)
    p.add_argument("--checkpoint", help="the checkpoint, for the COG's provenance tags (with --cog)")
    p.add_argument("--source", help="the data source, for the COG's provenance tags (with --cog)")
    p.add_argument("--cog", action="store_true", help="also write the tile's float32 Cloud-Optimized GeoTIFF")
    p.add_argument("--dims", type=int, help="keep the first N numbers (Matryoshka prefix of v2 embeddings)")
    p.add_argument("--float32", action="store_true", help="also write the unquantised float32 (H, W, D) .npy")
    p.add_argument("--threads", type=positive_int, help="threads compressing the COG (default: the CPUs this process may use)")
    p.add_argument("patches", nargs="+", help="patch embeddings named r<row>_c<col>.npz, or folders of them")
    p.set_defaults(func=cmd_assemble)


def cmd_publish(args: argparse.Namespace) -> None:
    from tessera.publish import publish

    publish(layout.Results(args.output_dir), Path(args.work_dir), [Path(p) for p in args.embeddings], family=args.family,
            variant=args.variant, checkpoint=Path(args.checkpoint), source=args.source, mosaics=args.mosaics,
            mosaic_cog=args.mosaic_cog, threads=args.threads,
            benchmarks_dir=Path(args.benchmarks) if args.benchmarks else None, inference=InferOptions.from_args(args))


def add_publish(sub) -> None:
    p = sub.add_parser("publish", help="(rule publish) manifests, quicklooks, mosaics, STAC and report of a run")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--work-dir", required=True, help="the config's work_dir (stack indexes, ROI masks)")
    p.add_argument("--family", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--mosaics", action="store_true", help="per-UTM-zone VRT mosaics of the tile COGs and quicklooks")
    p.add_argument("--mosaic-cog", action="store_true", help="also write each mosaic as a COG next to its VRT")
    p.add_argument("--threads", type=positive_int, default=1, help="quicklooks written at once")
    p.add_argument("--benchmarks", help="Snakemake benchmark folder (logs/benchmarks), for the report's timings")
    p.add_argument("embeddings", nargs="+", help="the tile-years' embeddings (.npy in geotessera's layout)")
    InferOptions.add_arguments(p, only=InferOptions.PROVENANCE)  # how inference ran, for the provenance
    p.set_defaults(func=cmd_publish)


def cmd_demo_catalog(args: argparse.Namespace) -> None:
    from tessera.demo import generate_catalog
    from tessera.roi import read_roi

    out = layout.demo_catalog(args.work_dir, args.year)
    generate_catalog(out.parent, args.year, read_roi(args.roi).bounds, seed=args.seed,
                     s2_revisit_days=args.s2_revisit_days, s1_revisit_days=args.s1_revisit_days)


def cmd_demo_checkpoint(args: argparse.Namespace) -> None:
    from tessera.models import make_demo_checkpoint

    make_demo_checkpoint(layout.demo_checkpoint(args.work_dir, args.family), family=args.family, size=args.size,
                         seed=args.seed)


def add_demo(sub) -> None:
    from tessera.models import family_names

    p = sub.add_parser("demo", help="(rules demo_catalog, demo_checkpoint) the embedded offline demo")
    demo = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = demo.add_parser("catalog", help="generate the synthetic scenes and their STAC catalog")
    q.add_argument("--roi", required=True)
    q.add_argument("--year", type=int, required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--s2-revisit-days", type=int, default=5)
    q.add_argument("--s1-revisit-days", type=int, default=12)
    q.add_argument("--work-dir", required=True, help="writes <work-dir>/demo/<year>/catalog.json and the COGs")
    q.set_defaults(func=cmd_demo_catalog)
    q = demo.add_parser("checkpoint", help="write seeded random weights in a family's published layout")
    q.add_argument("--family", required=True, choices=family_names())
    q.add_argument("--size", default="small",
                   help="the family's demo size (default small, the published small size where there is one); "
                        "v2 also has tiny, a far faster one for trying or benchmarking the pipeline on a CPU "
                        "(still 128 numbers per pixel); an unknown size names the family's sizes")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--work-dir", required=True, help="writes <work-dir>/demo/checkpoint-<family>.pt (whatever the size)")
    q.set_defaults(func=cmd_demo_checkpoint)


def cmd_download(args: argparse.Namespace) -> None:
    from tessera.download import download

    print(download(args.checkpoint, args.cache_dir, sha256=args.sha256))


def add_download(sub) -> None:
    p = sub.add_parser("download", help="(rule download) fetch a checkpoint by name or hf:// reference into the cache")
    p.add_argument("checkpoint", help="a published name (tessera models) or hf://owner/repo[@revision]/path")
    p.add_argument("--cache-dir", help="the config's model.cache_dir (default: $HF_HOME/tessera)")
    p.add_argument("--sha256", help="the SHA-256 the file must have, instead of the recorded one")
    p.set_defaults(func=cmd_download)


PARSERS = (add_download, add_fetch, add_infer, add_assemble, add_publish, add_demo)
