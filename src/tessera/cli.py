"""The `tessera` command: planning, and one sub-command per workflow stage.

Snakemake rules call these sub-commands with explicit arguments; users call `tessera plan` to see
what a config will do. Mistakes a user can fix end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rasterio.windows import Window

from tessera import __version__
from tessera.errors import DamagedIntermediate, UserError
from tessera.io import remove_path

log = logging.getLogger("tessera")


def _window(text: str) -> Window:
    """A pixel window written as col_off,row_off,width,height."""
    try:
        col, row, width, height = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not col_off,row_off,width,height") from None
    return Window(col, row, width, height)


def cmd_plan(args: argparse.Namespace) -> None:
    from tessera import config
    from tessera.plan import estimates, make_plan

    plan = make_plan(config.load(args.config))
    cfg = plan.config
    print(f"ROI {cfg['roi']}  year {cfg['year']}  source {cfg['source']}  model {cfg['model']['family']}")
    print(f"{'tile':<20} {'EPSG':>6} {'tile px':>11} {'work window (col,row,w,h)':>28} {'patches':>8}")
    for t in plan.tiles:
        w = t.window
        print(f"{t.name:<20} {t.tile.epsg:>6} {t.tile.width:>5}x{t.tile.height:<5} "
              f"{f'{w.col_off},{w.row_off},{w.width},{w.height}':>28} {len(t.patches):>8}")
    pixels = sum(t.window.width * t.window.height for t in plan.tiles)
    print(f"{len(plan.tiles)} tiles, {sum(len(t.patches) for t in plan.tiles)} patches, {pixels:,} pixels in work windows")
    counts = plan.job_counts()
    print("jobs: " + ", ".join(f"{rule} {n}" for rule, n in sorted(counts.items())) + f"; total {sum(counts.values())}")
    est = estimates(plan)
    searched = f"{est['cached_searches']} cached searches" if est["cached_searches"] else "typical revisits, no cached search yet"
    print(f"estimates ({searched}):")
    print(f"  scenes to read      S2 {est['s2_scenes']:,}, S1 {est['s1_scenes']:,}")
    print(f"  download            {est['download_bytes'] / 1e9:,.2f} GB at most (window reads, before COG compression)")
    print(f"  stacks on disk      {est['stack_bytes'] / 1e9:,.2f} GB uncompressed (Zarr + zstd stores less)")
    print(f"  compute             {est['macs'] / 1e12:,.1f} TMAC for {est['pixels']:,} work-window pixels "
          f"({cfg['model']['family']}; a GPU doing 10 TMAC/s takes {est['macs'] / 1e13 / 60:,.1f} min)")
    print(f"  outputs             {est['output_bytes'] / 1e9:,.2f} GB int8 + scales, {est['cog_bytes'] / 1e9:,.2f} GB "
          f"COGs, {est['float32_bytes'] / 1e9:,.2f} GB float32 .npy")


def cmd_roi_mask(args: argparse.Namespace) -> None:
    from tessera.grid import Tile
    from tessera.roi import read_roi, write_roi_mask

    write_roi_mask(read_roi(args.roi), Tile.from_name(args.tile), args.out)


def cmd_demo_catalog(args: argparse.Namespace) -> None:
    from tessera.demo import generate_catalog
    from tessera.roi import read_roi

    out = Path(args.out)
    generate_catalog(out.parent, args.year, read_roi(args.roi).bounds, seed=args.seed,
                     s2_revisit_days=args.s2_revisit_days, s1_revisit_days=args.s1_revisit_days)


def cmd_demo_checkpoint(args: argparse.Namespace) -> None:
    from tessera.models import make_demo_checkpoint

    make_demo_checkpoint(args.out, family=args.family, seed=args.seed)


def cmd_fetch(args: argparse.Namespace) -> None:
    from tessera import fetch
    from tessera.grid import Tile
    from tessera.roi import read_roi_mask
    from tessera.sources import open_source

    tile = Tile.from_name(args.tile)
    roi_mask = read_roi_mask(args.roi_mask, window=args.window)
    fetcher = fetch.fetch_s2 if args.sensor == "s2" else fetch.fetch_s1
    options = dict(roi_mask=roi_mask, min_coverage_pct=args.min_coverage_pct, min_scenes=args.min_scenes,
                   search_cache=Path(args.out).with_name(f"search_{args.sensor}.json"), patch_size=args.patch_size)
    if args.sensor == "s2":
        options["resampling"] = args.s2_resampling
    with open_source({"name": args.source, **json.loads(args.source_options or "{}")},
                     demo_catalog=args.demo_catalog) as source:
        fetcher(tile, args.window, args.year, source, Path(args.out), **options)


def cmd_search(args: argparse.Namespace) -> None:
    from tessera import config
    from tessera.fetch import print_scenes
    from tessera.plan import make_plan
    from tessera.sources import open_source

    plan = make_plan(config.load(args.config))
    cfg = plan.config
    if args.tile not in plan.by_name:
        raise UserError(f"tile {args.tile} is not in this config's plan: pick one of {', '.join(sorted(plan.by_name))}")
    tile_plan = plan.by_name[args.tile]
    if cfg["source"] == "demo":
        catalog = Path(cfg["work_dir"]) / "demo" / str(cfg["year"]) / "catalog.json"
        if not catalog.exists():
            raise UserError(f"the demo catalog {catalog} does not exist yet: run `snakemake --configfile ... demo_catalog` first")
    else:
        catalog = None
    with open_source({"name": cfg["source"], **cfg.get("stac", {})}, demo_catalog=catalog) as source:
        print_scenes(source, tile_plan.tile, tile_plan.window, cfg["year"],
                     cache_dir=Path(cfg["work_dir"]) / str(cfg["year"]) / args.tile)


def cmd_stack(args: argparse.Namespace) -> None:
    from tessera.export.observations import write_observation_counts
    from tessera.stack import write_stack_index

    write_stack_index(Path(args.s2), Path(args.s1), Path(args.out))
    if args.observations:
        write_observation_counts(Path(args.out), Path(args.observations))


def cmd_infer(args: argparse.Namespace) -> None:
    from tessera.patches import embed_stack_patches

    embed_stack_patches(
        Path(args.stack), args.patch, roi_mask_path=Path(args.roi_mask), checkpoint=Path(args.checkpoint),
        family=args.family, trust_checkpoint=args.trust_checkpoint, allow_source_mismatch=args.allow_source_mismatch,
        device=args.device, precision=args.precision,
        seed=args.seed, repeat_times=args.repeat_times, batch_pixels=args.batch_pixels, threads=args.threads,
        out_dir=Path(args.out_dir),
    )


def cmd_export_patches(args: argparse.Namespace) -> None:
    from tessera.patches import export_patches

    for path in export_patches(Path(args.stack), args.patch, Path(args.out_dir), roi_mask_path=Path(args.roi_mask),
                               patch_size=args.patch_size):
        log.info("wrote %s", path)


def cmd_assemble(args: argparse.Namespace) -> None:
    from tessera.assemble import assemble_tile
    from tessera.patches import PATCH_SUFFIX

    patch_files = []
    for path in map(Path, args.patches):
        patch_files += sorted(path.glob(f"r*_c*{PATCH_SUFFIX}")) if path.is_dir() else [path]
    assemble_tile(
        args.tile, patch_files, family=args.family, roi_mask_path=Path(args.roi_mask),
        embedding_path=Path(args.embedding), scales_path=Path(args.scales),
        checksums_path=Path(args.checksums), landmask_path=Path(args.landmask), dims=args.dims,
        float32_path=Path(args.float32) if args.float32 else None,
    )
    if args.cog:
        from tessera.export.cog import write_tile_cog
        from tessera.io import sha256_file

        tags = dict(t.split("=", 1) for t in args.tag)
        tags["TESSERA_CHECKPOINT_SHA256"] = sha256_file(args.checkpoint)
        write_tile_cog(Path(args.embedding), Path(args.scales), Path(args.landmask), Path(args.cog), tags=tags)


def cmd_catalog(args: argparse.Namespace) -> None:
    from tessera.export.geotessera import write_manifests, write_metadata

    output_dir = Path(args.output_dir)
    write_manifests(output_dir, family=args.family, variant=args.variant)
    write_metadata(output_dir / "tessera_metadata.json", family=args.family, variant=args.variant,
                   checkpoint=Path(args.checkpoint), source=args.source, year=args.year,
                   embeddings=[Path(p) for p in args.embeddings])


def _year_tiles(output_dir: Path, year: int):
    from tessera.export.geotessera import find_tiles

    return [files for files in find_tiles(output_dir) if files.year == year and files.present]


def cmd_quicklook(args: argparse.Namespace) -> None:
    from tessera.export.quicklook import write_quicklooks

    write_quicklooks(_year_tiles(Path(args.output_dir), args.year), Path(args.output_dir), args.year,
                     threads=args.threads)


def cmd_mosaic(args: argparse.Namespace) -> None:
    from tessera.export.mosaic import write_mosaic_cog, write_zone_mosaics

    for vrt in write_zone_mosaics(Path(args.output_dir), args.year):
        log.info("wrote %s", vrt)
        if args.cog:
            log.info("wrote %s", write_mosaic_cog(vrt, vrt.with_suffix(".tif")))


def _scene_ids(stack_indexes: list[str]) -> dict[str, dict[str, list[str]]]:
    from tessera.export.stac import scene_ids_from_stack_index

    return {json.loads(Path(p).read_text())["tile"]: scene_ids_from_stack_index(Path(p)) for p in stack_indexes}


def cmd_stac(args: argparse.Namespace) -> None:
    from tessera.export.stac import write_stac
    from tessera.io import sha256_file

    write_stac(Path(args.output_dir), year=args.year, family=args.family, checkpoint_sha256=sha256_file(args.checkpoint),
               source=args.source, variant=args.variant, scene_ids=_scene_ids(args.stacks))


def cmd_report(args: argparse.Namespace) -> None:
    from tessera.export.report import write_report

    write_report(Path(args.output_dir), args.year, Path(args.out), scene_ids=_scene_ids(args.stacks),
                 benchmarks_dir=Path(args.benchmarks) if args.benchmarks else None)


def cmd_verify(args: argparse.Namespace) -> int:
    from tessera.export.verify import verify_output

    problems = verify_output(Path(args.output_dir))
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.output_dir}", file=sys.stderr)
        return 1
    print(f"{args.output_dir}: OK")
    return 0


def cmd_embed_patch(args: argparse.Namespace) -> None:
    from tessera.infer import embed_reference_patch

    embed_reference_patch(Path(args.patch_dir), Path(args.checkpoint), args.family, Path(args.out),
                          data_source=args.data_source, trust_checkpoint=args.trust_checkpoint,
                          allow_source_mismatch=args.allow_source_mismatch, device=args.device,
                          precision=args.precision, seed=args.seed, repeat_times=args.repeat_times)


def cmd_install_profile(args: argparse.Namespace) -> None:
    from tessera.profiles import install_profile

    target = install_profile(args.name, cpu_partition=args.cpu_partition, gpu_partition=args.gpu_partition,
                             account=args.account, qos=args.qos, dest=Path(args.dest) if args.dest else None,
                             force=args.force)
    print(f"installed {target}; run: snakemake --profile {args.name} --configfile <your config>")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """How inference runs: the options that `infer` and `embed-patch` share."""
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary pickles")
    p.add_argument("--allow-source-mismatch", action="store_true",
                   help="embed data of another kind (mpc/aws) than the checkpoint was trained on (v1.1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat-times", type=int, default=1, help="random draws averaged per pixel (v1.0 families)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tessera-workflow {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="print the tiles, patches and job counts a config will produce")
    p.add_argument("--config", action="append", required=True, metavar="FILE",
                   help="config YAML; repeat to merge several in order, like snakemake --configfile")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("install-profile", help="install a shipped Snakemake profile for `snakemake --profile NAME`")
    p.add_argument("name", choices=["slurm"])
    p.add_argument("--cpu-partition", help="default: $TESSERA_CPU_PARTITION")
    p.add_argument("--gpu-partition", help="default: $TESSERA_GPU_PARTITION")
    p.add_argument("--account", help="SLURM account (default: $TESSERA_SLURM_ACCOUNT, else SLURM's default)")
    p.add_argument("--qos", help="SLURM QoS (default: $TESSERA_SLURM_QOS)")
    p.add_argument("--dest", help="profile root (default: $XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)")
    p.add_argument("--force", action="store_true", help="replace an existing profile of that name")
    p.set_defaults(func=cmd_install_profile)

    p = sub.add_parser("search", help="print the scenes a tile would use (date, platform, orbit, cloud, coverage)")
    p.add_argument("--config", action="append", required=True, metavar="FILE")
    p.add_argument("--tile", required=True)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("roi-mask", help="(rule fetch) rasterise the ROI onto a tile grid")
    p.add_argument("--roi", required=True)
    p.add_argument("--tile", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_roi_mask)

    p = sub.add_parser("demo-catalog", help="(rule demo_catalog) generate the synthetic demo scenes and STAC catalog")
    p.add_argument("--roi", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s2-revisit-days", type=int, default=5)
    p.add_argument("--s1-revisit-days", type=int, default=12)
    p.add_argument("--out", required=True, help="path of the catalog.json to write")
    p.set_defaults(func=cmd_demo_catalog)

    p = sub.add_parser("demo-checkpoint", help="(rule demo_checkpoint) write seeded random weights in a published layout")
    p.add_argument("--family", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_demo_checkpoint)

    p = sub.add_parser("fetch", help="(rule fetch) search and read a tile's scenes into its stack")
    p.add_argument("sensor", choices=["s2", "s1"])
    p.add_argument("--tile", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--window", type=_window, required=True, help="work window col_off,row_off,width,height")
    p.add_argument("--roi-mask", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--demo-catalog")
    p.add_argument("--source-options", help="JSON options of source stac (the config's stac mapping)")
    p.add_argument("--min-coverage-pct", type=float, default=0.01)
    p.add_argument("--min-scenes", type=int, default=1)
    p.add_argument("--s2-resampling", choices=["bilinear", "nearest"], default="bilinear")
    p.add_argument("--patch-size", type=int, default=512, help="inference patch edge (sets the stack's chunking)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("stack", help="(rule fetch) verify a tile's S2 and S1 stacks and index them")
    p.add_argument("--s2", required=True)
    p.add_argument("--s1", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--observations", help="also write the per-pixel observation counts GeoTIFF here")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("infer", help="(rule infer) embed patches of a tile's stack")
    p.add_argument("--stack", required=True, help="the tile's stack.json")
    p.add_argument("--patch", type=_window, action="append", required=True,
                   help="patch window col_off,row_off,width,height in tile pixels; repeat for several")
    p.add_argument("--roi-mask", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--family")
    _add_model_options(p)
    p.add_argument("--batch-pixels", type=int, default=4096)
    p.add_argument("--threads", type=int)
    p.add_argument("--out-dir", required=True, help="writes <out-dir>/r<row>_c<col>.npz per patch")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("export-patches", help="write a tile's stack in the reference per-patch .npy layout")
    p.add_argument("--stack", required=True, help="the tile's stack.json")
    p.add_argument("--roi-mask", required=True, help="the tile's roi.tif")
    p.add_argument("--patch", type=_window, action="append",
                   help="patch window col_off,row_off,width,height in tile pixels (default: all, cut at --patch-size)")
    p.add_argument("--patch-size", type=int, default=500, help="the reference retiler's patch size (default 500)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_export_patches)

    p = sub.add_parser("assemble", help="(rule assemble) patches -> int8 tile + scales in geotessera's layout")
    p.add_argument("--tile", required=True)
    p.add_argument("--family", required=True)
    p.add_argument("--roi-mask", required=True)
    p.add_argument("--embedding", required=True, help="int8 (H, W, D) .npy to write")
    p.add_argument("--scales", required=True, help="float32 (H, W) .npy to write")
    p.add_argument("--checksums", required=True, help="sha256sum-style file to write")
    p.add_argument("--landmask", required=True, help="landmask GeoTIFF to write")
    p.add_argument("--cog", help="also write the tile's float32 Cloud-Optimized GeoTIFF here")
    p.add_argument("--dims", type=int, help="keep the first N numbers (Matryoshka prefix of v2 embeddings)")
    p.add_argument("--float32", help="also write the unquantised float32 (H, W, D) .npy here")
    p.add_argument("--checkpoint", help="the checkpoint, for the COG's provenance tags (with --cog)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a COG tag (with --cog)")
    p.add_argument("patches", nargs="+", help="patch embeddings named r<row>_c<col>.npz, or folders of them")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("catalog", help="(rule catalog) manifests and tessera_metadata.json of an output directory")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--family", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("embeddings", nargs="+", help="the tiles' embedding .npy files")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("quicklook", help="(rule quicklook) one PCA basis for all tiles of a year, and each "
                       "tile's PCA-to-RGB PNG and COG")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="tiles written at once")
    p.set_defaults(func=cmd_quicklook)

    p = sub.add_parser("mosaic", help="(rule mosaic) per-UTM-zone VRT mosaics of the tile COGs and quicklooks")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--cog", action="store_true", help="also write each mosaic as a COG next to its VRT")
    p.set_defaults(func=cmd_mosaic)

    p = sub.add_parser("stac", help="(rule stac) STAC Collection and Items of the outputs")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--family", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("stacks", nargs="+", help="the tiles' stack.json (scene ids)")
    p.set_defaults(func=cmd_stac)

    p = sub.add_parser("report", help="(rule report) the HTML run report")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--benchmarks", help="Snakemake benchmark folder (logs/benchmarks) for timings")
    p.add_argument("stacks", nargs="+", help="the tiles' stack.json (scene ids)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("verify", help="check an output directory: files, checksums, shapes, scales, manifest")
    p.add_argument("output_dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("embed-patch", help="embed one directory in the reference per-patch layout")
    p.add_argument("patch_dir")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--family")
    p.add_argument("--data-source", choices=["mpc", "aws"],
                   help="the patch's kind of data, for per-source normalisation (v1.1); default: the checkpoint's")
    _add_model_options(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_embed_patch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        status = args.func(args)
    except DamagedIntermediate as exc:
        remove_path(exc.path)
        print(f"tessera: error: {exc}: removed it; run the workflow again to rebuild it", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A full disk, an exceeded quota, a permission: the job fails with one line, the previous
        # outputs stay as they were (every write is atomic).
        print(f"tessera: error: {exc}: check free space, quota and permissions, then rerun", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
