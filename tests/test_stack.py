import datetime as dt
import json

import numpy as np
import pytest
import zarr
from affine import Affine
from rasterio.windows import Window

from tessera.errors import UserError
from tessera.stack import (
    Preprocessing,
    StackGrid,
    open_s1,
    open_s2,
    read_window,
    verify_stack_index,
    write_s1,
    write_s2,
    write_stack_index,
)

H, W = 20, 30
GRID = StackGrid(
    tile="grid_6.05_52.05", year=2024, window=Window(100, 200, W, H), crs="EPSG:32632",
    transform=Affine(10, 0, 301000, 0, -10, 5770000), source="demo", data_kind="mpc",
    preprocessing=Preprocessing.expected_by("v2", "mpc"),
)


def _s2_step(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10000, (H, W, 10), dtype=np.uint16), rng.integers(0, 2, (H, W), dtype=np.uint8)


def _s1_step(seed):
    return np.random.default_rng(seed).integers(0, 32767, (H, W, 2), dtype=np.int16)


@pytest.fixture
def stacks(tmp_path):
    s2_path, s1_path = tmp_path / "s2.zarr", tmp_path / "s1.zarr"
    with write_s2(s2_path, GRID, chunk=8) as writer:
        writer.append(dt.date(2024, 1, 5), ["a1", "a2"], *_s2_step(1))
        writer.append(dt.date(2024, 12, 31), ["b"], *_s2_step(2))
        writer.skipped["bad"] = "truncated"
    with write_s1(s1_path, GRID, chunk=8) as writer:
        writer.append("ascending", dt.date(2024, 2, 1), ["s1a"], _s1_step(3))
        writer.append("ascending", dt.date(2024, 2, 13), ["s1b"], _s1_step(4))
    return s2_path, s1_path


def test_append_and_read_back(stacks):
    s2_path, s1_path = stacks
    s2, s1 = open_s2(s2_path), open_s1(s1_path)
    assert s2.grid == GRID and s1.grid == GRID
    assert s2.series.dates == ("2024-01-05", "2024-12-31")
    assert s2.series.doys.tolist() == [5, 366] and s2.series.doys.dtype == np.uint16
    assert s2.series.scenes == (("a1", "a2"), ("b",))
    assert s2.skipped == {"bad": "truncated"}
    bands, mask = _s2_step(2)
    np.testing.assert_array_equal(s2.bands[1], bands)
    np.testing.assert_array_equal(s2.masks[1], mask)
    assert s2.bands.chunks == (1, 8, 8, 10)
    assert len(s1.ascending) == 2 and len(s1.descending) == 0
    assert s1.descending.arrays["sar"].shape == (0, H, W, 2)
    assert s1.ascending.doys.tolist() == [32, 44] and s1.ascending.doys.dtype == np.int16
    np.testing.assert_array_equal(s1.ascending.arrays["sar"][0], _s1_step(3))
    assert zarr.open_group(s2_path, mode="r").attrs["complete"] is True


def test_failure_mid_write_leaves_no_store(tmp_path):
    path = tmp_path / "s2.zarr"
    with pytest.raises(RuntimeError):
        with write_s2(path, GRID) as writer:
            writer.append(dt.date(2024, 1, 5), ["a"], *_s2_step(1))
            raise RuntimeError("network gone")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_incomplete_store_is_refused(tmp_path, stacks):
    s2_path, _ = stacks
    zarr.open_group(s2_path, mode="r+").attrs["complete"] = False
    with pytest.raises(UserError, match="incomplete"):
        open_s2(s2_path)
    with pytest.raises(UserError, match="does not exist"):
        open_s1(tmp_path / "missing.zarr")


def test_a_store_without_its_data_kind_is_one_clear_error(stacks):
    """Stores written before the kind of data was recorded: refetch, no KeyError."""
    s2_path, _ = stacks
    group = zarr.open_group(s2_path, mode="r+")
    attrs = group.attrs.asdict()
    del attrs["data_kind"]
    group.attrs.put(attrs)
    with pytest.raises(UserError, match=r"s2.zarr lacks data_kind .*rerun the fetch of this tile"):
        open_s2(s2_path)


def test_appends_must_be_in_date_order_with_the_right_shapes(tmp_path):
    with pytest.raises(ValueError), write_s2(tmp_path / "s2.zarr", GRID) as writer:
        writer.append(dt.date(2024, 3, 1), ["a"], *_s2_step(1))
        writer.append(dt.date(2024, 3, 1), ["b"], *_s2_step(2))
    with pytest.raises(ValueError), write_s1(tmp_path / "s1.zarr", GRID) as writer:
        writer.append("descending", dt.date(2024, 3, 1), ["a"], _s1_step(1).astype(np.int32))
    assert list(tmp_path.iterdir()) == []


def test_read_window_pads_outside_with_zeros(stacks):
    arrays = read_window(*stacks, Window(W - 4, H - 5, 8, 8))
    bands, mask = _s2_step(1)
    assert arrays["bands"].shape == (2, 8, 8, 10) and arrays["bands"].dtype == np.uint16
    np.testing.assert_array_equal(arrays["bands"][0, :5, :4], bands[H - 5:, W - 4:])
    assert not arrays["bands"][:, 5:].any() and not arrays["bands"][:, :, 4:].any()
    np.testing.assert_array_equal(arrays["masks"][0, :5, :4], mask[H - 5:, W - 4:])
    assert arrays["sar_ascending"].shape == (2, 8, 8, 2)
    assert arrays["sar_descending"].shape == (0, 8, 8, 2)
    assert arrays["sar_descending_doy"].dtype == np.int16


def test_stack_index_records_and_verifies(tmp_path, stacks):
    s2_path, s1_path = stacks
    index = write_stack_index(s2_path, s1_path, tmp_path / "stack.json")
    on_disk = json.loads((tmp_path / "stack.json").read_text())
    assert on_disk == index
    assert index["s2"]["arrays"]["bands"]["shape"] == [2, H, W, 10]
    assert index["s1"]["ascending"]["scenes"] == [["s1a"], ["s1b"]]
    assert index["stores"] == {"s2": "s2.zarr", "s1": "s1.zarr"}
    verified = verify_stack_index(tmp_path / "stack.json")
    assert verified.s2_path == s2_path

    zarr.open_array(s2_path / "bands", mode="r+")[0, 3, 3, 3] += 1
    with pytest.raises(UserError, match="no longer matches.*s2"):
        verify_stack_index(tmp_path / "stack.json")


def test_a_stack_from_before_periods_were_recorded_still_verifies(tmp_path, stacks):
    """Stacks and indexes written before ``period`` and ``s1_orbit_state`` were recorded are of the
    whole year and both orbit directions: they still verify, so finished runs need no new fetch."""
    s2_path, s1_path = stacks
    index = write_stack_index(s2_path, s1_path, tmp_path / "stack.json")
    for key in ("period", "s1_orbit_state"):
        del index["preprocessing"][key]
    (tmp_path / "stack.json").write_text(json.dumps(index))
    for store in (s2_path, s1_path):
        group = zarr.open_group(store, mode="r+")
        group.attrs["preprocessing"] = index["preprocessing"]
    assert open_s2(s2_path).grid.preprocessing.period == "01-01/12-31"
    assert open_s1(s1_path).grid.preprocessing.s1_orbit_state == "both"
    verify_stack_index(tmp_path / "stack.json", checksums=False)  # does not refuse the older index


def test_a_stack_index_with_unknown_preprocessing_is_refused_in_one_line(tmp_path, stacks):
    s2_path, s1_path = stacks
    index = write_stack_index(s2_path, s1_path, tmp_path / "stack.json")
    index["preprocessing"]["resampling_of_the_future"] = "lanczos"
    (tmp_path / "stack.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"stack.json records preprocessing .* damaged or from another version"):
        verify_stack_index(tmp_path / "stack.json", checksums=False)


def test_stack_index_refuses_stacks_on_different_grids(tmp_path, stacks):
    s2_path, _ = stacks
    other = tmp_path / "other_s1.zarr"
    with write_s1(other, StackGrid(**{**GRID.__dict__, "window": Window(0, 0, W, H)})):
        pass
    with pytest.raises(UserError, match="disagree"):
        write_stack_index(s2_path, other, tmp_path / "stack.json")
    assert not (tmp_path / "stack.json").exists()


def test_corrupted_chunk_fails_to_read_instead_of_returning_garbage(tmp_path):
    """Per-chunk CRC-32C: flipping a byte inside a stored chunk is detected on read."""
    from tessera.stack import Preprocessing, StackGrid, open_s2, write_s2

    grid = StackGrid("grid_6.05_52.05", 2024, Window(0, 0, 16, 16), "EPSG:32632", Affine(10, 0, 500000, 0, -10, 5770000), "demo", "mpc",
                     Preprocessing.expected_by("v2", "mpc"))
    rng = np.random.default_rng(0)
    with write_s2(tmp_path / "s2.zarr", grid, chunk=16) as stack:
        stack.append(dt.date(2024, 5, 1), ["a"], rng.integers(0, 10000, (16, 16, 10), dtype=np.uint16), np.ones((16, 16), np.uint8))
    chunk = next(p for p in (tmp_path / "s2.zarr" / "bands").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception):
        open_s2(tmp_path / "s2.zarr").bands[:]


def test_a_record_without_preprocessing_is_refused_in_one_line_naming_it(tmp_path):
    """What publish reads of a stack index written before preprocessing was recorded."""
    from tessera.stack import Preprocessing

    with pytest.raises(UserError, match=r"old/stack.json records preprocessing \{\}, not the choices .* rerun the fetch") as refused:
        Preprocessing.from_attrs(None, tmp_path / "old" / "stack.json")
    assert "\n" not in str(refused.value)
