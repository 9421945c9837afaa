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


def _small_cog(tmp_path, driver="COG", bigtiff=False):
    """A 4-band float32 raster of 3 x 3 tiles of 256 px with one overview, as GDAL's COG driver
    (classic TIFF or BigTIFF, as the teacher's large tiles are) or as a plain tiled GeoTIFF (no tile
    frames) writes it."""
    import numpy as np
    import rasterio
    import rasterio.shutil

    data = np.random.default_rng(0).normal(size=(4, 600, 520)).astype(np.float32)
    path = tmp_path / f"{driver}.tif"
    if driver == "GTiff":
        with rasterio.open(path, "w", driver="GTiff", width=520, height=600, count=4, dtype="float32", tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate", predictor=3) as dst:
            dst.write(data)
        return path
    with rasterio.open("", "w", driver="MEM", width=520, height=600, count=4, dtype="float32") as raster:
        raster.write(data)
        rasterio.shutil.copy(raster, path, driver="COG", compress="DEFLATE", predictor=3, blocksize=256,
                             bigtiff="YES" if bigtiff else "NO")
    return path


@pytest.mark.parametrize("bigtiff", [False, True], ids=["tiff", "bigtiff"])
@pytest.mark.parametrize("damage", ["truncated", "last tile zeroed", "leader", "trailer", "offset"])
def test_cog_check_sees_what_a_failed_write_leaves(tmp_path, damage, bigtiff):
    import struct

    import rasterio

    from tessera.io import check_cog_complete

    path = _small_cog(tmp_path, bigtiff=bigtiff)
    assert path.read_bytes()[2] == (43 if bigtiff else 42)  # TIFF's version: 42, BigTIFF's 43
    check_cog_complete(path)  # the control
    data = bytearray(path.read_bytes())
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        count = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    if damage == "truncated":
        data = data[:-1]
    elif damage == "last tile zeroed":
        data[-100:] = bytes(100)
    elif damage == "leader":
        data[offset - 4:offset] = struct.pack("<I", count + 1)
    elif damage == "trailer":
        data[offset + count] ^= 0xFF
    else:  # an offset GDAL did not get to write: the table points at no tile
        entry = "<Q" if bigtiff else "<I"
        where = data.find(struct.pack(entry, offset))
        data[where:where + struct.calcsize(entry)] = struct.pack(entry, offset + 8)
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="was not written whole"):
        check_cog_complete(path)


def test_cog_check_reads_a_file_without_tile_frames_back_whole(tmp_path):
    from tessera.io import check_cog_complete

    path = _small_cog(tmp_path, "GTiff")
    check_cog_complete(path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(OSError, match="was not written whole"):
        check_cog_complete(path)
