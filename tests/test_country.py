"""Country-size runs in parts: `--batch publish=k/N` runs a Nth of the tile-years at a time, and the
last part's run-level products cover every part (README, "Country-size runs")."""

import json

import pytest

from conftest import job_stats, run_snakemake, write_tiny_config
from tessera.layout import Results, find_tiles

pytestmark = pytest.mark.slow


def test_a_run_in_two_parts_ends_with_products_covering_both(tmp_path):
    config = write_tiny_config(tmp_path)
    first = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "--batch", "publish=1/2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    stats = job_stats(first.stdout + first.stderr)
    assert stats["fetch"] == stats["assemble"] == 1 and "publish" not in stats  # one of the two tiles
    results = Results(tmp_path / "results")
    assert len([f for f in find_tiles(results) if f.embedding.exists()]) == 1 and not results.manifest.exists()

    second = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "--batch", "publish=2/2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    stats = job_stats(second.stdout + second.stderr)
    assert stats["fetch"] == stats["assemble"] == 1 and stats["publish"] == 1  # the other tile, then the run's products
    assert json.loads(results.metadata.read_text())["tiles"] == ["grid_5.95_52.05", "grid_6.05_52.05"]
    collection = json.loads(results.stac_collection.read_text())
    assert len([link for link in collection["links"] if link["rel"] == "item"]) == 2
    again = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr  # the parts are the run
