import pytest

from tessera.io import atomic_path


def test_atomic_path_leaves_nothing_on_failure_and_renames_on_success(tmp_path):
    final = tmp_path / "out.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole" and list(tmp_path.iterdir()) == [final]


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_one(tmp_path):
    # What SIGKILL leaves: a temporary file, a temporary store, GDAL's sidecars of a temporary.
    (tmp_path / ".grid_6.05_52.05.abc123.tmp.npy").write_text("stale")
    (tmp_path / ".grid_6.05_52.05.abc123.tmp.npy.staging.tif").write_text("stale")
    (tmp_path / ".s2.x1.tmp.zarr").mkdir()
    (tmp_path / ".s2.x1.tmp.zarr" / "chunk").write_text("stale")
    other = tmp_path / ".grid_6.05_52.05_scales.def456.tmp.npy"  # another output's temporary
    other.write_text("keep")
    same_stem = tmp_path / ".grid_6.05_52.05.ghi789.tmp.tiff"  # the temporary of grid_6.05_52.05.tiff
    same_stem.write_text("keep")
    with atomic_path(tmp_path / "grid_6.05_52.05.npy") as tmp:
        tmp.write_text("new")
    with atomic_path(tmp_path / "s2.zarr", directory=True) as tmp:
        (tmp / "zarr.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, same_stem.name, "grid_6.05_52.05.npy", "s2.zarr"])
