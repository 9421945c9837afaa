"""A self-contained HTML report of a run: provenance, tiles, coverage, scenes, timings, quicklooks.

One file, no scripts, no external resources: quicklook thumbnails (cropped to the pixels that have an
embedding) are embedded as base64 PNG and link to the full-size PNGs by relative paths. Coverage is the
share of ROI pixels (landmask = 1) that have an embedding (finite scale). Timings come from
Snakemake's benchmark TSVs (``benchmark:`` of each rule, e.g. ``logs/benchmarks/{rule}/{tile}.tsv``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.windows import Window

from tessera import __version__
from tessera.io import atomic_path
from tessera.layout import Results, TileFiles
from tessera.period import ALL_ORBITS, WHOLE_YEAR, Period, describe

THUMBNAIL_PIXELS = 240  # longest side of an embedded thumbnail
# Tiles where more than a tenth of the ROI has no embedding are highlighted: worth a look at the scenes.
LOW_COVERAGE_PERCENT = 90.0


@dataclass(frozen=True)
class TileCoverage:
    roi_pixels: int
    embedded_pixels: int

    @property
    def percent(self) -> float:
        return 100.0 * self.embedded_pixels / self.roi_pixels if self.roi_pixels else math.nan


def tile_coverage(files: TileFiles) -> TileCoverage:
    """ROI pixels of a tile (landmask = 1) and how many of them have an embedding (finite scale)."""
    with rasterio.open(files.landmask) as landmask:
        inside = landmask.read(1) > 0
    embedded = np.isfinite(np.load(files.scales, mmap_mode="r")) & inside
    return TileCoverage(int(inside.sum()), int(embedded.sum()))


@dataclass(frozen=True)
class Benchmark:
    rule: str
    job: str  # the benchmark file's path below the rule's folder, without .tsv (e.g. a tile name)
    seconds: float
    max_rss_mb: float  # NaN where Snakemake could not measure it
    cpu_seconds: float


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):  # Snakemake writes "-" or "NA" for what it could not measure
        return math.nan


def read_benchmarks(benchmarks_dir: Path) -> list[Benchmark]:
    """Every Snakemake benchmark TSV below a folder; repeated measurements of a job are averaged."""
    found = []
    for path in sorted(Path(benchmarks_dir).rglob("*.tsv")):
        relative = path.relative_to(benchmarks_dir).with_suffix("")
        rule, job = (relative.parts[0], "/".join(relative.parts[1:])) if len(relative.parts) > 1 else (relative.name, "")
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if not rows:
            continue
        def mean(column: str) -> float:
            return float(np.mean([_number(row.get(column)) for row in rows]))

        found.append(Benchmark(rule, job, mean("s"), mean("max_rss"), mean("cpu_time")))
    return found


def _data_window(scales_path: Path) -> Window | None:
    """The smallest pixel window holding every embedded pixel of a tile (None if there is none)."""
    embedded = np.isfinite(np.load(scales_path, mmap_mode="r"))
    rows, cols = np.flatnonzero(embedded.any(axis=1)), np.flatnonzero(embedded.any(axis=0))
    if rows.size == 0:
        return None
    return Window(cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)


def _thumbnail_png(quicklook_cog: Path, window: Window) -> bytes:
    """A small PNG of a window of a quicklook COG (read from its overviews where they suffice)."""
    factor = max(window.width, window.height) / THUMBNAIL_PIXELS
    with rasterio.open(quicklook_cog) as src:
        shape = (src.count, max(1, round(window.height / factor)), max(1, round(window.width / factor)))
        pixels = src.read(window=window, out_shape=shape, resampling=Resampling.average)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a picture, not a map
        with MemoryFile() as memory:
            with memory.open(driver="PNG", width=shape[2], height=shape[1], count=shape[0], dtype="uint8") as dst:
                dst.write(pixels)
            return memory.read()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; vertical-align: middle; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; font-family: monospace; }
.low { color: #b00; font-weight: bold; }
img { background: repeating-conic-gradient(#eee 0 25%, #fff 0 50%) 0 0 / 16px 16px; }
"""


def _table(headers: list[str], rows: list[list[str]], name_columns: int = 1) -> str:
    """An HTML table; cells are given already escaped, the first ``name_columns`` are left-aligned."""
    head = "".join(f'<th{" class=name" if i < name_columns else ""}>{h}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=name" if i < name_columns else ""}>{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _total(values: list[float]) -> float:
    """Sum of the measured values; NaN when none was measured."""
    measured = [v for v in values if not math.isnan(v)]
    return float(sum(measured)) if measured else math.nan


def _largest(values: list[float]) -> float:
    measured = [v for v in values if not math.isnan(v)]
    return float(max(measured)) if measured else math.nan


def _seconds(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:,.1f}"


def write_report(
    results: Results,
    tiles: list[TileFiles],
    *,
    scene_ids: dict[tuple[str, int], dict[str, list[str]]] | None = None,
    benchmarks_dir: Path | None = None,
) -> Path:
    """Write the HTML report of ``tiles`` (tile-years, every year of the run) to ``results.report``.

    A section per year (coverage, scene counts, job time and quicklook of each tile), then each
    tile's years side by side. ``scene_ids``: (tile name, year) -> {source collection: [scene ids]}
    (as for the STAC Items), for the scene counts; ``benchmarks_dir``: Snakemake's
    ``logs/benchmarks`` folder, for the timings.
    """
    out, scene_ids = results.report, scene_ids or {}
    metadata = json.loads(results.metadata.read_text()) if results.metadata.exists() else {}
    benchmarks = read_benchmarks(benchmarks_dir) if benchmarks_dir and Path(benchmarks_dir).is_dir() else []
    collections = sorted({name for ids in scene_ids.values() for name in ids})
    seconds_per_tile: dict[tuple[str, int], float] = defaultdict(float)
    for bench in benchmarks:  # per tile-year jobs are benchmarked as <rule>/<year>/<tile>[/<patch>].tsv
        parts = bench.job.split("/")
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].startswith("grid_") and not math.isnan(bench.seconds):
            seconds_per_tile[(parts[1], int(parts[0]))] += bench.seconds
    years = sorted({files.year for files in tiles})
    named = ", ".join(map(str, years))
    pictures = {(files.tile.name, files.year): _picture(results, files) for files in tiles}
    chosen = metadata.get("processing", {}).get("preprocessing", {})
    provenance = [
        ["model family", metadata.get("model_family", "–")],
        ["checkpoint", f'{metadata.get("checkpoint", "–")} (sha256 {metadata.get("checkpoint_sha256", "–")})'],
        ["data source", metadata.get("data_source", "–")],
        ["time series", describe(Period.parse(chosen.get("period", str(WHOLE_YEAR))),
                                 chosen.get("s1_orbit_state", ALL_ORBITS))],
        ["dataset version / variant", f'{metadata.get("dataset_version", "–")} / {metadata.get("dataset_variant", "–")}'],
        ["outputs generated", metadata.get("generated_at", "–")],
        ["made by", metadata.get("generator", "–")],
    ]
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>TESSERA run {named}</title><style>{_STYLE}</style></head><body>',
        f"<h1>TESSERA embeddings {named}</h1>",
        _table(["run", ""], [[html.escape(k), html.escape(str(v))] for k, v in provenance], name_columns=2),
        "<p>Coverage: ROI pixels with an embedding (no embedding where no valid observation was found). "
        "Quicklook: the first three principal components of the embeddings as RGB, one colour scale for the whole "
        "run (every tile and year), cropped to the embedded pixels; click for the whole tile.</p>",
    ]
    for year in years:
        of_year = [files for files in tiles if files.year == year]
        rows, total = _tile_rows(of_year, scene_ids, collections, seconds_per_tile, pictures)
        summary = (f"{len(of_year)} tile(s); {total.embedded_pixels:,} of {total.roi_pixels:,} ROI pixels have an "
                   f"embedding ({total.percent:.1f} %)" if total.roi_pixels else f"{len(of_year)} tile(s); no ROI pixel")
        parts += [f"<h2>{year}</h2>", f"<p>{html.escape(summary)}.</p>",
                  _table(["tile", "CRS", "pixels", "ROI pixels", "embedded", "coverage",
                          *[f"{html.escape(c)} scenes" for c in collections], "job time (s)", "quicklook"], rows)]
    if len(years) > 1:
        names = sorted({files.tile.name for files in tiles})
        rows = [[html.escape(name), *[pictures.get((name, year), "–") for year in years]] for name in names]
        parts += ["<h2>Years side by side</h2>", _table(["tile", *map(str, years)], rows)]
    rule_rows = _timing_rows(benchmarks)
    if rule_rows:
        parts += ["<h2>Timings</h2>",
                  _table(["rule", "jobs", "wall time, sum (s)", "longest job (s)", "CPU time (s)", "max RSS (MB)"], rule_rows)]
    parts.append(f"<p><small>Report by tessera-workflow {html.escape(__version__)}.</small></p></body></html>\n")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
    return out


def _picture(results: Results, files: TileFiles) -> str:
    """A tile-year's quicklook thumbnail, linked to its full-size PNG; "" without a quicklook."""
    png, rgb_cog = results.quicklook(files.tile.name, files.year)
    window = _data_window(files.scales) if files.scales.exists() else None
    if not rgb_cog.exists() or window is None:
        return ""
    encoded = base64.b64encode(_thumbnail_png(rgb_cog, window)).decode()
    image = f'<img alt="PCA quicklook of {files.tile.name} {files.year}" src="data:image/png;base64,{encoded}">'
    return f'<a href="{html.escape(os.path.relpath(png, results.report.parent))}">{image}</a>' if png.exists() else image


def _tile_rows(tiles: list[TileFiles], scene_ids: dict, collections: list[str],
               seconds_per_tile: dict[tuple[str, int], float],
               pictures: dict[tuple[str, int], str]) -> tuple[list[list[str]], TileCoverage]:
    """One table row per tile-year (name, grid, coverage, scenes, job time, thumbnail) and their coverage."""
    rows, total = [], TileCoverage(0, 0)
    for files in tiles:
        key = (files.tile.name, files.year)
        coverage = tile_coverage(files) if files.present else None
        if coverage:
            total = TileCoverage(total.roi_pixels + coverage.roi_pixels, total.embedded_pixels + coverage.embedded_pixels)
        percent = coverage.percent if coverage else math.nan
        rows.append([
            html.escape(files.tile.name),
            f"EPSG:{files.tile.epsg}",
            f"{files.tile.width} × {files.tile.height}",
            f"{coverage.roi_pixels:,}" if coverage else "incomplete",
            f"{coverage.embedded_pixels:,}" if coverage else "–",
            f'<span class="{"low" if percent < LOW_COVERAGE_PERCENT else ""}">{percent:.1f} %</span>' if coverage and coverage.roi_pixels else "–",
            *[str(len(scene_ids.get(key, {}).get(c, []))) for c in collections],
            _seconds(seconds_per_tile[key]) if key in seconds_per_tile else "–",
            pictures[key],
        ])
    return rows, total


def _timing_rows(benchmarks: list[Benchmark]) -> list[list[str]]:
    """One table row per rule: jobs, summed and longest wall time, CPU time, peak memory."""
    per_rule: dict[str, list[Benchmark]] = defaultdict(list)
    for bench in benchmarks:
        per_rule[bench.rule].append(bench)
    rows = []
    for rule, jobs in sorted(per_rule.items()):
        max_rss = _largest([j.max_rss_mb for j in jobs])
        rows.append([
            html.escape(rule), str(len(jobs)), _seconds(_total([j.seconds for j in jobs])),
            _seconds(_largest([j.seconds for j in jobs])), _seconds(_total([j.cpu_seconds for j in jobs])),
            "–" if math.isnan(max_rss) else f"{max_rss:,.0f}",
        ])
    return rows
