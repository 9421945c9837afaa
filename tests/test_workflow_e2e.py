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


@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat", "v1.1"])
def test_the_demo_runs_with_every_model_family(tiny_demo_run, tmp_path, family):
    """The finished tiny run with model.family switched: the stacks are kept, every tile is
    embedded again with that family's demo checkpoint, and the outputs verify."""
    import shutil

    from conftest import write_tiny_config
    from tessera.cli import main

    reference_dir, _, _ = tiny_demo_run
    workdir = shutil.copytree(reference_dir, tmp_path / "run")
    config = write_tiny_config(workdir, model={"family": family, "checkpoint": "demo"})
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    stats = job_stats(result.stdout + result.stderr)
    assert "fetch" not in stats and stats["demo_checkpoint"] == 1 and stats["infer"] >= 4 and stats["assemble"] == 2
    metadata = json.loads((workdir / "results/tessera_metadata.json").read_text())
    assert metadata["model_family"] == family
    assert main(["-q", "verify", str(workdir / "results")]) == 0
