"""tessera.layout: the paths of the work and output directories, the patch file, and the reference
per-patch layout (one writer, one reader, one checker)."""

import datetime as dt

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from tessera.errors import DamagedIntermediate, UserError
from tessera.layout import (
    REFERENCE_ARRAYS,
    Results,
    WorkTile,
    check_reference_arrays,
    patch_files,
    patch_origin,
    read_patch_embedding,
    read_reference_patch,
    read_reference_roi,
    write_patch_embedding,
    write_reference_patch,
)
from tessera.stack import Preprocessing, StackGrid, read_window, write_s1, write_s2

from faults import flip_byte

GRID = StackGrid("grid_6.05_52.05", 2024, Window(0, 0, 20, 12), "EPSG:32632", Affine(10, 0, 500000, 0, -10, 5770000),
                 "demo", "mpc", Preprocessing.expected_by("v2", "mpc"))


def test_paths_are_geotesseras_layout_and_the_documented_work_layout():
    results, work = Results("out"), WorkTile.at("work", 2024, "grid_6.05_52.05")
    assert str(results.embedding("grid_6.05_52.05", 2024)) == \
        "out/global_0.1_degree_representation/2024/grid_6.05_52.05/grid_6.05_52.05.npy"
    assert str(results.scales("grid_6.05_52.05", 2024)).endswith("2024/grid_6.05_52.05/grid_6.05_52.05_scales.npy")
    assert str(results.landmask("grid_6.05_52.05")) == "out/global_0.1_degree_tiff_all/grid_6.05_52.05.tiff"
    assert str(results.mosaic("tessera", 2024, 32632)) == "out/mosaic/2024/tessera_2024_epsg32632.vrt"
    assert str(work.patch("r0_c32")) == "work/2024/grid_6.05_52.05/patches/r0_c32.npz"
    assert str(work.search("s1")) == "work/2024/grid_6.05_52.05/search_s1.json"
    # Snakemake wildcards pass through unchanged, so the rules spell their paths with these functions.
    assert str(WorkTile.at("work", 2024, "{tile}").stack_index) == "work/2024/{tile}/stack.json"


def test_patch_files_round_trip_and_damage_is_named(tmp_path):
    embedding = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    write_patch_embedding(tmp_path / "p" / "r4_c8.npz", embedding)
    np.testing.assert_array_equal(read_patch_embedding(tmp_path / "p" / "r4_c8.npz"), embedding)
    assert patch_origin(tmp_path / "p" / "r4_c8.npz") == (4, 8)
    assert patch_files([tmp_path / "p"]) == [tmp_path / "p" / "r4_c8.npz"]
    with pytest.raises(UserError, match="not named r<row>_c<col>.npz"):
        patch_origin(tmp_path / "p" / "r4_c8.npy")
    flip_byte(tmp_path / "p" / "r4_c8.npz")
    with pytest.raises(DamagedIntermediate):
        read_patch_embedding(tmp_path / "p" / "r4_c8.npz")


@pytest.fixture
def stacks(tmp_path):
    rng = np.random.default_rng(0)
    with write_s2(tmp_path / "s2.zarr", GRID, chunk=8) as writer:
        for day in (5, 40):
            writer.append(dt.date(2024, 1, 1) + dt.timedelta(days=day), [f"s2-{day}"],
                          rng.integers(0, 10000, (12, 20, 10), dtype=np.uint16), np.ones((12, 20), np.uint8))
    with write_s1(tmp_path / "s1.zarr", GRID, chunk=8) as writer:
        writer.append("ascending", dt.date(2024, 2, 1), ["s1a"], rng.integers(1, 9000, (12, 20, 2), dtype=np.int16))
    return tmp_path / "s2.zarr", tmp_path / "s1.zarr"


def _write(tmp_path, stacks, window) -> tuple:
    arrays = read_window(*stacks, window)
    roi = np.zeros((window.height, window.width), np.uint8)
    roi[1:3, 1:3] = 1
    write_reference_patch(tmp_path / "patch", arrays, roi, crs=GRID.crs, transform=GRID.transform)
    return arrays, roi


def test_reference_patch_round_trip(tmp_path, stacks):
    window = Window(5, 2, 16, 16)  # reaches past the stacks: zero-padded, as the reference retiler pads
    expected, roi = _write(tmp_path, stacks, window)
    assert sorted(p.name for p in (tmp_path / "patch").iterdir()) == sorted(
        [f"{name}.npy" for name in REFERENCE_ARRAYS] + ["roi.tiff"])
    back = read_reference_patch(tmp_path / "patch")
    assert back.keys() == expected.keys()
    for key in expected:
        assert back[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(back[key], expected[key])
    np.testing.assert_array_equal(read_reference_roi(tmp_path / "patch", (16, 16)), roi > 0)
    with rasterio.open(tmp_path / "patch" / "roi.tiff") as src:
        assert src.nodata is None and src.profile["compress"] == "lzw"


def test_reference_patch_checks_dtypes_and_shapes(tmp_path, stacks):
    _write(tmp_path, stacks, Window(0, 0, 4, 4))
    np.save(tmp_path / "patch" / "doys.npy", np.array([5, 366], dtype=np.int64))
    with pytest.raises(UserError, match="doys.npy is int64"):
        read_reference_patch(tmp_path / "patch")
    np.save(tmp_path / "patch" / "doys.npy", np.array([5], dtype=np.uint16))
    with pytest.raises(UserError, match=r"doys has shape \(1,\), expected \(2,\)"):
        read_reference_patch(tmp_path / "patch")
    arrays = read_window(*stacks, Window(0, 0, 4, 4))
    del arrays["sar_descending_doy"]
    with pytest.raises(UserError, match="lack sar_descending_doy"):
        check_reference_arrays(arrays)
