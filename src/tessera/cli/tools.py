"""Tools around the stages: plan, models, search, check-source, verify, change, compare, embed-patch,
export-patches, install-profile."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tessera import layout
from tessera.cli.stages import window_arg
from tessera.errors import UserError
from tessera.options import FetchOptions, InferOptions

log = logging.getLogger("tessera")


def cmd_plan(args: argparse.Namespace) -> None:
    from tessera import config
    from tessera.period import describe, variant_of
    from tessera.plan import estimates, make_plan

    plan = make_plan(config.load(args.config))
    cfg = plan.config
    years = ", ".join(map(str, cfg["years"]))
    print(f"ROI {cfg['roi']}  years {years}  source {cfg['source']}  model {cfg['model']['family']}")
    period, s1_orbit_state = FetchOptions.from_config(cfg).time_series
    print(f"time series: {describe(period, s1_orbit_state)}; dataset variant "
          f"{variant_of(cfg['export']['variant'], period, s1_orbit_state)}")
    print(f"{'tile':<20} {'EPSG':>6} {'tile px':>11} {'work window (col,row,w,h)':>28} {'patches':>8}")
    for t in plan.tiles:
        w = t.window
        print(f"{t.name:<20} {t.tile.epsg:>6} {t.tile.width:>5}x{t.tile.height:<5} "
              f"{f'{w.col_off},{w.row_off},{w.width},{w.height}':>28} {len(t.patches):>8}")
    pixels = sum(t.window.width * t.window.height for t in plan.tiles)
    print(f"{len(plan.tiles)} tiles, {sum(len(t.patches) for t in plan.tiles)} patches, {pixels:,} pixels in work windows, "
          f"x {len(cfg['years'])} year(s)")
    counts = plan.job_counts()
    print("jobs: " + ", ".join(f"{rule} {n}" for rule, n in sorted(counts.items())) + f"; total {sum(counts.values())}")
    est = estimates(plan)
    searched = f"{est['cached_searches']} cached searches" if est["cached_searches"] else "typical revisits, no cached search yet"
    print(f"estimates ({searched}):")
    print(f"  scenes to read      S2 {est['s2_scenes']:,}, S1 {est['s1_scenes']:,}")
    print(f"  download            {est['download_bytes'] / 1e9:,.2f} GB at most (window reads, before COG compression)")
    print(f"  stacks on disk      {est['stack_bytes'] / 1e9:,.2f} GB uncompressed (Zarr with Blosc and zstd stores less)")
    print(f"  compute             {est['macs'] / 1e12:,.1f} TMAC for {est['pixels']:,} work-window pixels "
          f"({cfg['model']['family']}; a GPU doing 10 TMAC/s takes {est['macs'] / 1e13 / 60:,.1f} min)")
    print(f"  outputs             {est['output_bytes'] / 1e9:,.2f} GB int8 + scales, {est['cog_bytes'] / 1e9:,.2f} GB "
          f"COGs, {est['float32_bytes'] / 1e9:,.2f} GB float32 .npy")


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="print the tiles, patches and job counts a config will produce")
    p.add_argument("--config", action="append", required=True, metavar="FILE",
                   help="config YAML; repeat to merge several in order, like snakemake --configfile")
    p.set_defaults(func=cmd_plan)


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
    year = args.year or cfg["years"][0]
    if year not in cfg["years"]:
        raise UserError(f"year {year} is not one of this config's years ({', '.join(map(str, cfg['years']))}): pick one")
    catalog = layout.demo_catalog(cfg["work_dir"], year)
    if cfg["source"] == "demo" and not catalog.exists():
        raise UserError(f"the demo catalog {catalog} does not exist yet: run `snakemake --configfile ... demo_catalog` first")
    with open_source({"name": cfg["source"], **cfg.get("stac", {})}, demo_catalog=catalog) as source:
        period, s1_orbit_state = FetchOptions.from_config(cfg).time_series
        print_scenes(source, tile_plan.tile, tile_plan.window, year, period=period, s1_orbit_state=s1_orbit_state,
                     work=layout.WorkTile.at(cfg["work_dir"], year, args.tile))


def add_search(sub) -> None:
    p = sub.add_parser("search", help="print the scenes a tile would use (date, platform, orbit, cloud, coverage)")
    p.add_argument("--config", action="append", required=True, metavar="FILE")
    p.add_argument("--tile", required=True)
    p.add_argument("--year", type=int, help="one of the config's years (default: its first)")
    p.set_defaults(func=cmd_search)


def cmd_check_source(args: argparse.Namespace) -> int:
    from tessera import config
    from tessera.plan import make_plan
    from tessera.sources import open_source
    from tessera.sources.check import check_source

    plan = make_plan(config.load(args.config))
    cfg = plan.config
    if args.tile is None:
        tile_plan = plan.tiles[0]
    elif args.tile in plan.by_name:
        tile_plan = plan.by_name[args.tile]
    else:
        raise UserError(f"tile {args.tile} is not in this config's plan: pick one of {', '.join(sorted(plan.by_name))}")
    catalog = layout.demo_catalog(cfg["work_dir"], cfg["year"])
    if cfg["source"] == "demo" and not catalog.exists():
        raise UserError(f"the demo catalog {catalog} does not exist yet: run `snakemake --configfile ... demo_catalog` first")
    with open_source({"name": cfg["source"], **cfg.get("stac", {})}, demo_catalog=catalog) as source:
        report = check_source(source, tile_plan.tile, tile_plan.window, cfg["year"])
    return 0 if report.ok else 1


def add_check_source(sub) -> None:
    p = sub.add_parser("check-source", help="check the configured source in about a minute: credentials, search, "
                                            "one block of every asset kind, scenes and bytes per tile-year")
    p.add_argument("--config", action="append", required=True, metavar="FILE")
    p.add_argument("--tile", help="a tile of the plan (default: the first)")
    p.set_defaults(func=cmd_check_source)


def cmd_verify(args: argparse.Namespace) -> int:
    from tessera.publish.verify import describe_processing, verify_output

    for line in describe_processing(Path(args.output_dir)):
        print(f"made with: {line}")
    problems = verify_output(Path(args.output_dir))
    if args.work_dir:
        from tessera.publish.verify import skipped_scenes

        for line in skipped_scenes(Path(args.output_dir), Path(args.work_dir)):
            print(f"note: {line}")
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.output_dir}", file=sys.stderr)
        return 1
    print(f"{args.output_dir}: OK")
    return 0


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check an output directory: files, checksums, shapes, scales, manifest")
    p.add_argument("output_dir")
    p.add_argument("--work-dir", help="the run's work_dir: also list the scenes each tile's fetch skipped, and why")
    p.set_defaults(func=cmd_verify)


def cmd_compare(args: argparse.Namespace) -> int:
    from tessera.compare import HEADER, compare

    results, (low, high) = compare(Path(args.a), Path(args.b), histogram=Path(args.histogram), year=args.year)
    print(f"A = {args.a}\nB = {args.b}\ncosine similarity of A and B on the pixels both embed:")
    print(HEADER)
    for comparison in results:
        print(comparison.line())
    print(f"histogram of the cosines in [{low:g}, {high:g}], {sum(c.pixels for c in results):,} pixels: {args.histogram}")
    if args.min_cosine is None:
        return 0
    failing = [c for c in results if not c.median >= args.min_cosine]
    for comparison in failing:
        print(f"{comparison.year} {comparison.tile}: median cosine {comparison.median:.6f} is below "
              f"{args.min_cosine}", file=sys.stderr)
    return 1 if failing else 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare two output directories (geotessera layout) tile by tile: cosine "
                       "similarity and int8 storage error on their common pixels")
    p.add_argument("a", help="an output directory, e.g. ours")
    p.add_argument("b", help="another, e.g. published tiles downloaded with geotessera")
    p.add_argument("--year", type=int, help="compare only this year")
    p.add_argument("--histogram", default="compare_histogram.png", help="PNG of the cosine histogram to write "
                   "(default: compare_histogram.png)")
    p.add_argument("--min-cosine", type=float,
                   help="exit with status 1 when a tile's median cosine similarity is below this (e.g. 0.99)")
    p.set_defaults(func=cmd_compare)


def cmd_embed_patch(args: argparse.Namespace) -> None:
    from tessera.infer import embed_reference_patch

    embed_reference_patch(Path(args.patch_dir), Path(args.checkpoint), args.family, Path(args.out),
                          data_kind=args.data_source, options=InferOptions.from_args(args))


def add_embed_patch(sub) -> None:
    p = sub.add_parser("embed-patch", help="embed one directory in the reference per-patch layout")
    p.add_argument("patch_dir")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--family")
    p.add_argument("--data-source", choices=["mpc", "aws"],
                   help="the patch's kind of data, for per-kind normalisation (v1.1); default: the checkpoint's")
    InferOptions.add_arguments(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_embed_patch)


def cmd_export_patches(args: argparse.Namespace) -> None:
    from tessera.infer import export_patches

    for path in export_patches(Path(args.stack), args.patch, Path(args.out_dir), roi_mask_path=Path(args.roi_mask),
                               patch_size=args.patch_size):
        log.info("wrote %s", path)


def add_export_patches(sub) -> None:
    p = sub.add_parser("export-patches", help="write a tile's stack in the reference per-patch .npy layout")
    p.add_argument("--stack", required=True, help="the tile's stack.json")
    p.add_argument("--roi-mask", required=True, help="the tile's roi.tif")
    p.add_argument("--patch", type=window_arg, action="append",
                   help="patch window col_off,row_off,width,height in tile pixels (default: all, cut at --patch-size)")
    p.add_argument("--patch-size", type=int, default=500, help="the reference retiler's patch size (default 500)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_export_patches)


def cmd_install_profile(args: argparse.Namespace) -> None:
    from tessera.profiles import install_profile

    target = install_profile(args.name, cpu_partition=args.cpu_partition, gpu_partition=args.gpu_partition,
                             account=args.account, qos=args.qos, dest=Path(args.dest) if args.dest else None,
                             force=args.force)
    print(f"installed {target}; run: snakemake --profile {args.name} --configfile <your config>")


def add_install_profile(sub) -> None:
    p = sub.add_parser("install-profile", help="install a shipped Snakemake profile for `snakemake --profile NAME`")
    p.add_argument("name", choices=["slurm"])
    p.add_argument("--cpu-partition", help="default: $TESSERA_CPU_PARTITION")
    p.add_argument("--gpu-partition", help="default: $TESSERA_GPU_PARTITION")
    p.add_argument("--account", help="SLURM account (default: $TESSERA_SLURM_ACCOUNT, else SLURM's default)")
    p.add_argument("--qos", help="SLURM QoS (default: $TESSERA_SLURM_QOS)")
    p.add_argument("--dest", help="profile root (default: $XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)")
    p.add_argument("--force", action="store_true", help="replace an existing profile of that name")
    p.set_defaults(func=cmd_install_profile)


def cmd_models(args: argparse.Namespace) -> None:
    from tessera.download import cache_root, cached_path, published_file
    from tessera.models import HUB, NOT_BY_NAME, PUBLISHED, REGISTRY

    print(f"{'family':<12} {'dataset':>7}  checkpoints by name (model.checkpoint)")
    for entry in REGISTRY:
        names = [p.name for p in PUBLISHED if p.family == entry.name]
        print(f"{entry.name:<12} {entry.dataset_version:>7}  {', '.join(names) if names else '(by path or hf://)'}")
    print(f"\n{'name':<11} {'family':<11} {'params':>8} {'size':>10}  where from")
    for p in PUBLISHED:
        size = f"{p.size / 1e6:,.1f} MB" if p.size else "?"
        cached = " (cached)" if cached_path(published_file(p), args.cache_dir).is_file() else ""
        print(f"{p.name:<11} {p.family:<11} {p.params:>8} {size:>10}  {HUB}/{p.repo_id} {p.filename}{cached}")
    print()
    for family, where in NOT_BY_NAME.items():
        print(f"{family:<11} not by name: {where}")
    print(f"\nAlso: hf://owner/repo[@revision]/path for any file on the Hub. Cache: {cache_root(args.cache_dir)}")


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list the model families, the checkpoints published by name and where they come from")
    p.add_argument("--cache-dir", help="the config's model.cache_dir (default: $HF_HOME/tessera)")
    p.set_defaults(func=cmd_models)



def cmd_change(args: argparse.Namespace) -> None:
    from tessera.change import write_change_maps

    for cog, png in write_change_maps(layout.Results(args.output_dir), args.first_year, args.second_year):
        print(f"{cog}  {png}")


def add_change(sub) -> None:
    p = sub.add_parser("change", help="per-pixel cosine distance between two years' embeddings of each tile "
                       "(COG + PNG under <output-dir>/change/)")
    p.add_argument("--output-dir", required=True, help="an output directory holding both years")
    p.add_argument("first_year", type=int)
    p.add_argument("second_year", type=int)
    p.set_defaults(func=cmd_change)


PARSERS = (add_plan, add_models, add_search, add_check_source, add_verify, add_change, add_compare, add_embed_patch, add_export_patches, add_install_profile)
