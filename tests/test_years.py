"""Several years in one run: the DAG over (tile, year), run-level products over every year, adding a
year to a finished run, and change maps between two years."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import yaml

from conftest import REPO, job_stats, run_snakemake, write_tiny_config
from tessera import config as cfg
from tessera.change import cosine_distance
from tessera.cli import main
from tessera.errors import UserError
from tessera.layout import Results, TileFiles, find_tiles
from tessera.plan import make_plan

pytestmark = pytest.mark.slow
TILES = ("grid_5.95_52.05", "grid_6.05_52.05")


@pytest.mark.parametrize("year, years", [(2024, [2024]), ([2024, 2018], [2018, 2024]), ("2021-2023", [2021, 2022, 2023])])
def test_year_is_one_a_list_or_a_range(year, years):
    assert cfg.validate({"roi": "6.0,52.0,6.1,52.1", "year": year})["years"] == years


@pytest.mark.parametrize("year, message", [("2023-2021", "must run forwards"), ([2024, 2030], "greater than the maximum"),
                                           ([2024, 2024], "non-unique"), ("2016-2018", "within 2017-2025")])
def test_bad_years_are_one_line(year, message):
    with pytest.raises(UserError, match=message):
        cfg.validate({"roi": "6.0,52.0,6.1,52.1", "year": year})


def test_dry_run_and_plan_count_every_tile_year(tmp_path):
    config = write_tiny_config(tmp_path, year=[2022, 2023, 2024])
    result = run_snakemake(tmp_path, "-n", "--configfile", str(config), "--cores", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    stats = job_stats(result.stdout)
    expected = make_plan(cfg.load([REPO / "config/config.yaml", config])).job_counts()
    assert stats.pop("total") == sum(expected.values()) and stats == dict(expected)
    assert stats["fetch"] == stats["assemble"] == 2 * 3 and stats["demo_catalog"] == 3 and stats["publish"] == 1


@pytest.fixture(scope="module")
def two_years(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("years")
    config = write_tiny_config(workdir, year=[2023, 2024])
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, config


def test_every_tile_has_both_years_and_the_run_level_products_cover_them(two_years):
    workdir, _ = two_years
    results = Results(workdir / "results")
    present = {(files.tile.name, files.year) for files in find_tiles(results) if files.present}
    assert present == {(tile, year) for tile in TILES for year in (2023, 2024)}
    assert sorted(pq.read_table(results.manifest).column("year").to_pylist()) == [2023, 2023, 2024, 2024]
    assert json.loads(results.metadata.read_text())["years"] == [2023, 2024]
    report = results.report.read_text()
    assert "<h2>2023</h2>" in report and "<h2>2024</h2>" in report and "Years side by side" in report
    collection = json.loads(results.stac_collection.read_text())
    items = [link["href"] for link in collection["links"] if link["rel"] == "item"]
    assert len(items) == 4 and any("2023" in href for href in items) and any("2024" in href for href in items)
    # One PCA basis for every year, so that a tile's years compare by colour.
    assert (results.quicklooks(2023) / "pca.json").read_text() == (results.quicklooks(2024) / "pca.json").read_text()
    for year in (2023, 2024):
        assert (results.mosaic("tessera", year, 32632)).exists()
    assert main(["-q", "verify", str(results.root)]) == 0


def test_the_years_differ_and_a_year_compared_with_itself_does_not_change(two_years, tmp_path):
    workdir, _ = two_years
    results = Results(workdir / "results")
    tile = find_tiles(results)[0].tile
    first, second = TileFiles.locate(results, tile, 2023), TileFiles.locate(results, tile, 2024)
    same = cosine_distance(first, first)
    assert np.nanmax(np.abs(same)) == 0.0 and np.isfinite(same).any()
    assert np.nanmean(cosine_distance(first, second)) > 1e-3  # other scenes, other embeddings
    assert main(["-q", "change", "--output-dir", str(results.root), "2023", "2024"]) == 0
    cog, png = results.change(tile.name, 2023, 2024)
    with rasterio.open(cog) as src:
        assert src.crs.to_epsg() == tile.epsg and src.transform == tile.transform and src.dtypes[0] == "float32"
        np.testing.assert_allclose(src.read(1), cosine_distance(first, second), equal_nan=True)
    assert png.stat().st_size > 0
    assert main(["-q", "change", "--output-dir", str(results.root), "2023", "2023"]) == 0
    with rasterio.open(results.change(tile.name, 2023, 2023)[0]) as src:
        assert np.nanmax(src.read(1)) == 0.0  # a year against itself: no change anywhere


def test_adding_a_year_runs_only_that_years_jobs(two_years, tmp_path):
    import shutil

    workdir = shutil.copytree(two_years[0], tmp_path / "run", symlinks=True)
    config = write_tiny_config(workdir, year=[2022, 2023, 2024])
    before = {p: p.stat().st_mtime_ns for p in (workdir / "results/global_0.1_degree_representation").rglob("*.npy")}
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    stats = job_stats(result.stdout + result.stderr)
    assert stats["demo_catalog"] == 1 and stats["fetch"] == 2 and stats["assemble"] == 2 and stats["publish"] == 1
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())  # 2023 and 2024 untouched
    assert {files.year for files in find_tiles(Results(workdir / "results")) if files.present} == {2022, 2023, 2024}
    # Removing a year again deletes nothing: the run-level products describe the years of the run.
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "year": 2024}))
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {files.year for files in find_tiles(Results(workdir / "results")) if files.present} == {2022, 2023, 2024}
    assert json.loads(Results(workdir / "results").metadata.read_text())["years"] == [2024]


@pytest.mark.interop
def test_geotessera_reads_both_years(two_years, tmp_path):
    pytest.importorskip("geotessera")
    from geotessera import GeoTessera

    results = Results(two_years[0] / "results")
    gt = GeoTessera(embeddings_dir=results.root, registry_dir=results.root, cache_dir=tmp_path)
    for files in find_tiles(results):
        embedding, _, _ = gt.fetch_embedding(files.tile.lon, files.tile.lat, files.year)
        codes, scales = np.load(files.embedding), np.load(files.scales)
        np.testing.assert_array_equal(embedding, codes.astype(np.float32) * scales[..., None])
