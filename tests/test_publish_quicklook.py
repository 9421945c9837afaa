"""PCA quicklooks (tessera.publish.quicklook) on tiles whose principal axes are known, and the run
report (tessera.publish.report) that shows them."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.io import MemoryFile

from tessera.errors import UserError
from tessera.layout import Results, TileFiles, find_tiles
from tessera.publish.quicklook import fit_pca, write_tile_quicklook
from tessera.publish.report import THUMBNAIL_PIXELS, read_benchmarks, write_report
from tessera.grid import Tile

DIMS = 8
SCALE = np.float32(0.004)
# Orthonormal axes: tile A varies along AXES[0] (large spread), tile B along AXES[1] (smaller spread),
# and both a little along AXES[2].
AXES = np.linalg.qr(np.random.default_rng(3).normal(size=(DIMS, 3)))[0].T


def _write_tile(out: Path, name: str, spreads: tuple[float, float, float], filled_rows: slice) -> TileFiles:
    """int8 codes + scales of a tile whose pixels in ``filled_rows`` lie on the given axes; NaN scale elsewhere."""
    files = TileFiles.locate(Results(out), Tile.from_name(name), 2024)
    height, width = files.tile.height, files.tile.width
    rng = np.random.default_rng(sum(map(ord, name)))
    coefficients = rng.normal(size=(height, width, 3)) * np.asarray(spreads)
    values = coefficients @ AXES + 0.1
    codes = np.clip(np.rint(values / SCALE), -127, 127).astype(np.int8)
    scales = np.full((height, width), np.nan, np.float32)
    scales[filled_rows] = SCALE
    codes[~np.isfinite(scales)] = 0
    files.embedding.parent.mkdir(parents=True)
    np.save(files.embedding, codes)
    np.save(files.scales, scales)
    return files


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[TileFiles]:
    out = tmp_path_factory.mktemp("quicklook")
    return [
        _write_tile(out, "grid_5.85_52.05", (0.12, 0.0, 0.02), slice(100, 700)),
        _write_tile(out, "grid_5.95_52.05", (0.0, 0.06, 0.02), slice(300, 1000)),
    ]


def test_pca_finds_the_axes_of_every_tile_in_order_with_fixed_signs(tiles):
    basis = fit_pca(tiles, max_pixels=20_000)
    alignment = np.abs(basis.components @ AXES.T)
    np.testing.assert_allclose(alignment, np.eye(3), atol=0.03)  # axis 1 only exists in the second tile
    largest = np.abs(basis.components).argmax(axis=1)
    assert (basis.components[np.arange(3), largest] > 0).all()
    np.testing.assert_allclose(basis.mean, 0.1, atol=0.01)


def test_pca_is_deterministic_and_round_trips(tiles, tmp_path):
    basis = fit_pca(tiles, max_pixels=5_000, seed=11)
    again = fit_pca(tiles, max_pixels=5_000, seed=11)
    other_seed = fit_pca(tiles, max_pixels=5_000, seed=12)
    for name in ("mean", "components", "low", "high"):
        np.testing.assert_array_equal(getattr(basis, name), getattr(again, name))
    assert not np.array_equal(basis.low, other_seed.low)
    basis.save(tmp_path / "pca.json")  # the record of the colours: exact values, readable without tessera
    saved = json.loads((tmp_path / "pca.json").read_text())
    for name in ("mean", "components", "low", "high"):
        np.testing.assert_array_equal(getattr(basis, name), np.asarray(saved[name]))


def test_too_few_pixels_is_a_user_error(tmp_path):
    empty = _write_tile(tmp_path, "grid_6.05_52.05", (0.1, 0.1, 0.1), slice(0, 0))
    with pytest.raises(UserError, match="0 embedded pixel"):
        fit_pca([empty])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the PNG is a picture, not a map
def test_tile_quicklook_png_and_cog(tiles, tmp_path):
    basis = fit_pca(tiles)
    files = tiles[0]
    png, cog = Results(tmp_path).quicklook(files.tile.name, 2024)
    write_tile_quicklook(files, basis, png, cog)
    assert sorted(p.name for p in png.parent.iterdir()) == [png.name, cog.name]  # no staging or .aux.xml left

    scales = np.load(files.scales)
    valid = np.isfinite(scales)
    codes = np.load(files.embedding)
    with rasterio.open(png) as picture:
        assert picture.driver == "PNG" and picture.count == 4 and picture.dtypes[0] == "uint8"
        rgba = np.moveaxis(picture.read(), 0, -1)
    assert rgba.shape == (files.tile.height, files.tile.width, 4)
    np.testing.assert_array_equal(rgba[..., 3], np.where(valid, 255, 0))
    assert (rgba[~valid] == 0).all()
    row, col = 400, 321
    expected = basis.to_rgb(codes[row, col].astype(np.float32) * scales[row, col])
    np.testing.assert_array_equal(rgba[row, col, :3], expected)
    # The 2–98 % stretch: about 2 % of the pixels sit at each end of the first component's range.
    red = rgba[..., 0][valid]
    assert 0.005 < (red == 0).mean() < 0.06 and 0.005 < (red == 255).mean() < 0.06

    with rasterio.open(cog) as rgb:
        assert rgb.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert rgb.count == 4 and rgb.dtypes == ("uint8",) * 4
        assert [c.name for c in rgb.colorinterp] == ["red", "green", "blue", "alpha"]
        assert rgb.crs.to_epsg() == files.tile.epsg and rgb.transform == files.tile.transform
        assert rgb.overviews(1), "a COG quicklook needs overviews"
        np.testing.assert_array_equal(np.moveaxis(rgb.read(), 0, -1), rgba)


# --- the run report, which shows the quicklooks --------------------------------------------------

BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _benchmark(path: Path, *rows: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BENCHMARK_HEADER + "".join(f"{row}\n" for row in rows))


def test_read_benchmarks_averages_repeats_and_keeps_unmeasured_as_nan(tmp_path):
    _benchmark(tmp_path / "assemble" / "grid_5.95_52.05.tsv",
               "10.0\t0:00:10\t200.0\t-\t-\t-\t-\t-\t-\t8.0", "20.0\t0:00:20\t300.0\t-\t-\t-\t-\t-\t-\t12.0")
    _benchmark(tmp_path / "infer" / "grid_5.95_52.05" / "r0_c0.tsv", "5.0\t0:00:05\tNA\t-\t-\t-\t-\t-\t-\t-")
    _benchmark(tmp_path / "catalog.tsv", "1.0\t0:00:01\t50\t-\t-\t-\t-\t-\t-\t0.5")
    benchmarks = {(b.rule, b.job): b for b in read_benchmarks(tmp_path)}
    assert set(benchmarks) == {("assemble", "grid_5.95_52.05"), ("infer", "grid_5.95_52.05/r0_c0"), ("catalog", "")}
    assemble = benchmarks["assemble", "grid_5.95_52.05"]
    assert (assemble.seconds, assemble.max_rss_mb, assemble.cpu_seconds) == (15.0, 250.0, 10.0)
    assert np.isnan(benchmarks["infer", "grid_5.95_52.05/r0_c0"].max_rss_mb)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, str]:
    from test_publish_verify import build_output_dir

    root = tmp_path_factory.mktemp("report")
    out = build_output_dir(root, cogs=False)
    tiles = find_tiles(Results(out))
    basis = fit_pca(tiles)
    for files in tiles[:2]:
        write_tile_quicklook(files, basis, *Results(out).quicklook(files.tile.name, 2024))
    benchmarks = root / "logs" / "benchmarks"
    for files in tiles:
        _benchmark(benchmarks / "assemble" / "2024" / f"{files.tile.name}.tsv", "2.0\t0:00:02\t100\t-\t-\t-\t-\t-\t-\t1.5")
        _benchmark(benchmarks / "infer" / "2024" / files.tile.name / "r0_c0.tsv", "30.0\t0:00:30\t-\t-\t-\t-\t-\t-\t-\t-")
    scene_ids = {(f.tile.name, f.year): {"sentinel-2-l2a": ["a", "b", "c"][: i + 1], "sentinel-1-rtc": ["d"]}
                 for i, f in enumerate(tiles)}
    path = write_report(Results(out), find_tiles(Results(out)), scene_ids=scene_ids, benchmarks_dir=benchmarks)
    return out, path, path.read_text()


def _rows(page: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell, cells stripped of tags."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S):
        cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S)]
        rows[cells[0]] = cells
    return rows


def test_report_lists_tiles_with_coverage_scene_counts_and_job_time(report):
    out, _, page = report
    rows = _rows(page)
    headers = rows["tile"]
    total_roi = total_embedded = 0
    for i, files in enumerate(find_tiles(Results(out))):
        with rasterio.open(files.landmask) as landmask:
            inside = landmask.read(1) == 1
        embedded = int((np.isfinite(np.load(files.scales)) & inside).sum())
        total_roi, total_embedded = total_roi + int(inside.sum()), total_embedded + embedded
        cells = dict(zip(headers, rows[files.tile.name]))
        assert cells["ROI pixels"] == f"{int(inside.sum()):,}" and cells["embedded"] == f"{embedded:,}"
        assert cells["coverage"] == f"{100 * embedded / inside.sum():.1f} %"
        assert cells["sentinel-2-l2a scenes"] == str(i + 1) and cells["sentinel-1-rtc scenes"] == "1"
        assert cells["job time (s)"] == "32.0"
        assert cells["CRS"] == f"EPSG:{files.tile.epsg}"
    assert f"{total_embedded:,} of {total_roi:,} ROI pixels have an embedding" in page
    assert dict(zip(rows["rule"], rows["assemble"])) == {
        "rule": "assemble", "jobs": "3", "wall time, sum (s)": "6.0", "longest job (s)": "2.0",
        "CPU time (s)": "4.5", "max RSS (MB)": "100"}
    assert rows["infer"][-2:] == ["–", "–"]  # Snakemake measured neither CPU time nor memory


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # thumbnails are pictures
def test_report_embeds_thumbnails_and_links_quicklooks_relatively(report):
    out, path, page = report
    images = re.findall(r'<img alt="PCA quicklook of (grid_[\d._]+) 2024" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in images] == ["grid_5.85_52.05", "grid_5.95_52.05"]  # the third has no quicklook
    for name, encoded in images:
        with MemoryFile(base64.b64decode(encoded)) as memory, memory.open() as thumbnail:
            assert thumbnail.driver == "PNG" and thumbnail.count == 4
            assert max(thumbnail.width, thumbnail.height) == THUMBNAIL_PIXELS
            opaque = thumbnail.read(4) > 0
            # Cropped to the embedded pixels: they reach all four edges; the hole and the cell's slant are transparent.
            assert opaque[0].any() and opaque[-1].any() and opaque[:, 0].any() and opaque[:, -1].any()
            assert not opaque.all()
    links = re.findall(r'<a href="([^"]+)">', page)
    assert links == [f"quicklook/2024/{name}_2024.png" for name, _ in images]
    assert all((path.parent / link).is_file() for link in links)
    assert not re.search(r'(src|href)="(https?:)?//', page), "the report must not need the network"


def test_report_without_scenes_or_benchmarks(report):
    out, _, _ = report
    page = write_report(Results(out), find_tiles(Results(out))).read_text()
    assert "grid_5.95_52.05" in page and "scenes" not in page and "Timings" not in page
    assert 'href="quicklook/2024/grid_5.85_52.05_2024.png"' in page  # relative to the report's folder
