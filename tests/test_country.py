"""Country-size runs in parts: `--batch all=k/N` runs a Nth of the tile-years at a time (rule all asks
for every tile-year's embedding, sorted before the run-level products), and the run-level products
cover every part at the end (README, "Country-size runs")."""

import json

import pytest

from conftest import job_stats, run_snakemake, write_tiny_config
from tessera.layout import Results, find_tiles

pytestmark = pytest.mark.slow


def test_a_run_in_parts_makes_whole_tile_years_then_products_covering_every_part(tmp_path):
    config = write_tiny_config(tmp_path)
    results = Results(tmp_path / "results")
    # The tiny run's rule all asks for 2 embeddings and 12 run-level files (sidecar, 3 manifests, the
    # quicklook folder, 4 mosaics, STAC, Zarr, report): in 14 parts, one file each, embeddings first.
    for part, tile in ((1, "grid_5.95_52.05"), (2, "grid_6.05_52.05")):
        run = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "--batch", f"all={part}/14")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        stats = job_stats(run.stdout + run.stderr)
        assert stats["fetch"] == stats["assemble"] == 1 and "publish" not in stats, part  # one tile-year a part
        assert {f.tile.name for f in find_tiles(results) if f.embedding.exists()} >= {tile}
    assert not results.manifest.exists()

    last = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2")
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-5000:]
    stats = job_stats(last.stdout + last.stderr)
    assert stats == {"publish": 1, "all": 1, "total": 2}  # the parts are done: only the run-level products
    assert json.loads(results.metadata.read_text())["tiles"] == ["grid_5.95_52.05", "grid_6.05_52.05"]
    collection = json.loads(results.stac_collection.read_text())
    assert len([link for link in collection["links"] if link["rel"] == "item"]) == 2


def test_a_lost_embedding_is_made_again_though_the_products_are_present(tiny_demo_run, tmp_path):
    """Rule all asks for each embedding: without it, Snakemake took a deleted one (and its removed
    patch) for a discarded intermediate of up-to-date products and did nothing."""
    import shutil

    workdir = shutil.copytree(tiny_demo_run[0], tmp_path / "run")
    config = workdir / "tiny.yaml"
    lost = Results(workdir / "results").embedding("grid_5.95_52.05", 2024)
    lost.unlink()
    rerun = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert job_stats(rerun.stdout + rerun.stderr)["assemble"] == 1 and lost.exists()
