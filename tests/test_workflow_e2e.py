"""The whole workflow end to end on a tiny demo config: STAC fetch, stack, inference, exports."""

import json

import numpy as np
import pytest
import rasterio

from conftest import TINY_ROI, job_stats, run_snakemake
from tessera.grid import Tile
from tessera.layout import PATCH_SUFFIX, read_patch_embedding
from tessera.roi import rasterize_roi, read_roi

pytestmark = pytest.mark.slow

def test_all_stages_ran(tiny_demo_run):
    _, _, result = tiny_demo_run
    stats = job_stats(result.stdout + result.stderr)
    for rule in ["demo_catalog", "demo_checkpoint", "fetch", "infer", "assemble", "publish"]:
        assert stats[rule] >= 1, rule
    assert stats["fetch"] == 2 and stats["infer"] >= 4


def test_geotessera_layout_and_no_data(tiny_demo_run):
    workdir, _, _ = tiny_demo_run
    roi = read_roi(TINY_ROI)
    metadata = json.loads((workdir / "results/tessera_metadata.json").read_text())
    assert metadata["dataset_version"] == "2.0" and metadata["dataset_variant"] == "local"
    assert len(metadata["checkpoint_sha256"]) == 64
    for name in ["grid_5.95_52.05", "grid_6.05_52.05"]:
        tile = Tile.from_name(name)
        folder = workdir / "results/global_0.1_degree_representation/2024" / name
        codes = np.load(folder / f"{name}.npy")
        scales = np.load(folder / f"{name}_scales.npy")
        assert codes.dtype == np.int8 and codes.shape[:2] == (tile.height, tile.width) and codes.flags.c_contiguous
        assert scales.dtype == np.float32 and scales.shape == (tile.height, tile.width)
        inside = rasterize_roi(roi, tile) > 0
        assert np.isnan(scales[~inside]).all() and (codes[~inside] == 0).all()
        valid = np.isfinite(scales)
        assert valid.sum() > 0.9 * inside.sum()  # synthetic scenes leave few pixels unobserved
        assert ((scales[valid] > 0) & (scales[valid] < 1)).all()
        with rasterio.open(workdir / "results/global_0.1_degree_tiff_all" / f"{name}.tiff") as landmask:
            assert landmask.crs.to_epsg() == tile.epsg and landmask.transform == tile.transform
            np.testing.assert_array_equal(landmask.read(1) > 0, inside)
        checksums = (folder / "SHA256").read_text().split()
        assert checksums[1] == f"{name}.npy" and checksums[3] == f"{name}_scales.npy"


def test_cog_matches_dequantised_tile(tiny_demo_run):
    workdir, _, _ = tiny_demo_run
    name = "grid_6.05_52.05"
    tile = Tile.from_name(name)
    folder = workdir / "results/global_0.1_degree_representation/2024" / name
    dequantised = np.load(folder / f"{name}.npy").astype(np.float32) * np.load(folder / f"{name}_scales.npy")[..., None]
    with rasterio.open(workdir / f"results/cog/2024/{name}_2024.tif") as cog:
        assert cog.crs.to_epsg() == 32632 and np.isnan(cog.nodata)
        assert cog.descriptions[0] == "Tessera_Band_0" and cog.tags()["TESSERA_MODEL"] == "v2"
        # On the tile grid: a whole-pixel offset from the tile's origin, same pixel size.
        col, row = ~tile.transform @ (cog.transform.c, cog.transform.f)
        assert (col, row) == (round(col), round(row)) and cog.transform.a == 10.0
        data = np.moveaxis(cog.read(), 0, -1)
    expected = dequantised[round(row):round(row) + data.shape[0], round(col):round(col) + data.shape[1]]
    assert np.isfinite(expected[..., 0]).sum() == np.isfinite(dequantised[..., 0]).sum()  # every embedding is in
    np.testing.assert_array_equal(np.isnan(data), np.isnan(expected))
    np.testing.assert_allclose(data[np.isfinite(data)], expected[np.isfinite(expected)], rtol=1e-6)


def test_second_run_does_nothing(tiny_demo_run):
    workdir, config, _ = tiny_demo_run
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_people_can_see_and_catalogue_the_run(tiny_demo_run):
    """Quicklooks, observation counts, zone mosaics, STAC and the report come out of the run."""
    import pystac

    from tessera.publish.verify import verify_output

    workdir, _, _ = tiny_demo_run
    results = workdir / "results"
    assert verify_output(results) == []
    collection = pystac.Collection.from_file(str(results / "stac/collection.json"))
    items = list(collection.get_items())
    assert sorted(item.id for item in items) == ["grid_5.95_52.05_2024", "grid_6.05_52.05_2024"]
    for item in items:
        assert item.properties["proj:code"] in ("EPSG:32631", "EPSG:32632")
        assert item.properties["tessera:scenes"]["sentinel-2-l2a"]  # the scene ids that made it
        assert {"embeddings", "scales", "landmask", "cog"} <= set(item.assets)
    for name, epsg in [("grid_5.95_52.05", 32631), ("grid_6.05_52.05", 32632)]:
        with rasterio.open(results / f"observations/2024/{name}_2024.tif") as counts:
            s2_steps, s1_steps = counts.read(1), counts.read(2)
        inside = rasterize_roi(read_roi(TINY_ROI), Tile.from_name(name)) > 0
        assert s2_steps[inside].min() > 0 and s1_steps[inside].min() > 0
        assert (results / f"quicklook/2024/{name}_2024.png").stat().st_size > 0
        assert (results / f"mosaic/2024/tessera_2024_epsg{epsg}.vrt").exists()
    report = (results / "report.html").read_text()
    assert "grid_5.95_52.05" in report and "data:image/png;base64" in report


def test_our_stacks_in_the_reference_layout_embed_to_our_embeddings(tiny_demo_run, tmp_path):
    """tessera export-patches writes the reference per-patch layout; tessera embed-patch on it gives
    the embeddings the workflow computed for the same pixels."""
    from tessera.cli import main

    workdir, _, _ = tiny_demo_run
    tile = workdir / "work/2024/grid_6.05_52.05"
    stack = json.loads((tile / "stack.json").read_text())
    col_off, row_off, width, height = stack["window"]
    size = max(width, height)
    assert main(["-q", "export-patches", "--stack", str(tile / "stack.json"), "--roi-mask", str(tile / "roi.tif"),
                 "--patch-size", str(size), "--out-dir", str(tmp_path / "ref")]) == 0
    (patch_dir,) = (tmp_path / "ref").iterdir()
    assert patch_dir.name == f"0_0_{width}_{height}"
    assert sorted(p.name for p in patch_dir.iterdir()) == sorted(
        ["bands.npy", "masks.npy", "doys.npy", "sar_ascending.npy", "sar_ascending_doy.npy",
         "sar_descending.npy", "sar_descending_doy.npy", "roi.tiff"])
    assert main(["-q", "embed-patch", str(patch_dir), "--checkpoint", str(workdir / "work/demo/checkpoint-v2.pt"),
                 "--family", "v2", "--out", str(tmp_path / "ref.npy")]) == 0
    reference = np.load(tmp_path / "ref.npy")
    patches = sorted((tile / "patches").glob(f"r*_c*{PATCH_SUFFIX}"))
    assert patches
    for patch in patches:
        row, col = (int(v[1:]) for v in patch.stem.split("_"))
        ours = read_patch_embedding(patch)
        theirs = reference[row - row_off:row - row_off + ours.shape[0], col - col_off:col - col_off + ours.shape[1]]
        inside = np.isfinite(ours[..., 0])  # outside the ROI we write no-data; the reference embeds everything
        np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-5)


def test_search_prints_the_scenes_a_tile_would_use(tiny_demo_run, monkeypatch, capsys):
    from tessera.cli import main

    workdir, config, _ = tiny_demo_run
    monkeypatch.chdir(workdir)
    assert main(["-q", "search", "--config", str(config), "--tile", "grid_6.05_52.05"]) == 0
    out = capsys.readouterr().out
    stack = json.loads((workdir / "work/2024/grid_6.05_52.05/stack.json").read_text())
    for scene in stack["s2"]["scenes"][0] + stack["s1"]["ascending"]["scenes"][0]:
        assert scene in out  # every scene the fetch used is listed, with its date
    assert stack["s2"]["dates"][0] in out


@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat", "v1.1", "v2-teacher"])
def test_the_demo_runs_with_every_model_family(tiny_demo_run, tmp_path, family):
    """The finished tiny run with model.family switched: every tile is embedded again with that
    family's demo checkpoint, and the outputs verify. The stacks are fetched again only for the
    families trained on other preprocessing (v1.x: nearest S2 resampling; the tiny run's are v2's),
    and the stacks and metadata say what each family's run did."""
    import shutil

    from conftest import write_tiny_config
    from tessera.cli import main
    from tessera.models import family_entry
    from tessera.stack import Preprocessing

    reference_dir, _, _ = tiny_demo_run
    workdir = shutil.copytree(reference_dir, tmp_path / "run")
    config = write_tiny_config(workdir, model={"family": family, "checkpoint": "demo"})
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    stats = job_stats(result.stdout + result.stderr)
    resampling = family_entry(family).s2_resampling
    assert stats.get("fetch", 0) == (0 if resampling == "bilinear" else 2)
    assert stats["demo_checkpoint"] == 1 and stats["infer"] >= 4 and stats["assemble"] == 2
    stacks = sorted(workdir.glob("work/2024/grid_*/stack.json"))
    assert len(stacks) == 2
    for stack in stacks:
        assert json.loads(stack.read_text())["preprocessing"] == Preprocessing.expected_by(family, "mpc").attrs()
    metadata = json.loads((workdir / "results/tessera_metadata.json").read_text())
    assert metadata["model_family"] == family
    processing = metadata["processing"]
    assert processing["preprocessing"]["s2_resampling"] == resampling and processing["preprocessing_as_trained"]
    assert processing["inference"] == {"device": "cpu", "precision": "auto", "seed": 0, "repeat_times": 1,
                                       "precision_in_effect": "fp32"}
    assert main(["-q", "verify", str(workdir / "results")]) == 0


def test_compare_tells_two_seeds_apart_and_a_run_agrees_with_itself(tiny_demo_run, tmp_path, capsys):
    """v1.0 draws its time steps at random: two seeds give different embeddings of the same data,
    which still correlate; a run compared with itself agrees exactly."""
    import shutil

    from conftest import write_tiny_config
    from tessera.cli import main
    from tessera.compare import compare

    reference_dir, _, _ = tiny_demo_run
    runs = {}
    for seed in (0, 1):
        workdir = shutil.copytree(runs.get(0, reference_dir), tmp_path / f"seed{seed}")
        config = write_tiny_config(workdir, model={"family": "v1.0", "checkpoint": "demo"}, infer={"per": "patch",
                                                                                                   "seed": seed})
        result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
        assert result.returncode == 0, result.stderr[-4000:]
        runs[seed] = workdir
    zero, one = runs[0] / "results", runs[1] / "results"
    assert json.loads((one / "tessera_metadata.json").read_text())["processing"]["inference"]["seed"] == 1
    results, _ = compare(zero, one, histogram=tmp_path / "seeds.png")
    assert len(results) == 2
    for tile in results:
        assert tile.pixels > 0 and tile.only_a == tile.only_b == 0
        assert 0.5 < tile.median < 0.9999 and tile.within_storage_error < 0.5
    assert main(["compare", str(zero), str(one), "--histogram", str(tmp_path / "h.png"), "--min-cosine", "0.9999"]) == 1
    assert main(["compare", str(zero), str(zero), "--histogram", str(tmp_path / "same.png"),
                 "--min-cosine", "0.9999"]) == 0
    same, _ = compare(zero, zero, histogram=tmp_path / "same.png")
    assert all(t.minimum > 0.99999 and t.within_storage_error == 1.0 for t in same)
