"""Our outputs read by the tools users read them with.

Unmarked: the per-zone VRT mosaics through GDAL (rasterio), which every user of the mosaics goes
through. Marked ``interop`` (need ``pip install -e '.[interop]'``, skipped otherwise): geotessera 0.7.5
(Python 3.11; later releases: test_geotessera_current.py) offline on our geotessera-layout
directory, ``rio cogeo validate`` on every COG, rioxarray on the COGs and mosaics.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from pyproj import Transformer
from rasterio.windows import Window
from shapely import box

from tessera.layout import Results, find_tiles
from tessera.publish.mosaic import ZoneGrid, write_mosaic_cog, write_zone_mosaics
from tessera.publish.quicklook import fit_pca, write_tile_quicklook
from tessera.grid import Tile
from tessera.roi import rasterize_roi
from test_publish_verify import YEAR, build_output_dir, copy_of_output_dir

ZONE31 = ("grid_5.85_52.05", "grid_5.95_52.05")


def _dequantised(files) -> np.ndarray:
    return np.load(files.embedding).astype(np.float32) * np.load(files.scales)[..., None]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Three tiles (two in zone 31, one in zone 32) with float COGs, quicklooks and zone mosaics."""
    out = copy_of_output_dir(tmp_path_factory, tmp_path_factory.mktemp("mosaic") / "results")
    tiles = find_tiles(Results(out))
    basis = fit_pca(tiles)
    for files in tiles:
        write_tile_quicklook(files, basis, *Results(out).quicklook(files.tile.name, YEAR))
    write_zone_mosaics(Results(out), [f.tile for f in tiles], YEAR)
    return out


def _mosaic(out: Path, layer: str, epsg: int) -> Path:
    return out / "mosaic" / str(YEAR) / f"{layer}_{YEAR}_epsg{epsg}.vrt"


# --- mosaics (GDAL through rasterio) -------------------------------------------------------------


def test_one_mosaic_per_zone_and_layer(run_dir):
    assert sorted(p.name for p in (run_dir / "mosaic" / str(YEAR)).iterdir()) == [
        "quicklook_2024_epsg32631.vrt", "quicklook_2024_epsg32632.vrt",
        "tessera_2024_epsg32631.vrt", "tessera_2024_epsg32632.vrt",
    ]
    with rasterio.open(_mosaic(run_dir, "tessera", 32632)) as zone32:
        assert zone32.crs.to_epsg() == 32632 and zone32.count == 16
        assert zone32.descriptions[0] == "Tessera_Band_0" and np.isnan(zone32.nodata)


def test_zone_grid_is_snapped_and_tiles_move_less_than_a_pixel_north_west():
    tiles = [Tile.from_name(name) for name in ZONE31]
    grid = ZoneGrid.for_tiles(tiles)
    assert grid.transform.c % 10 == 0 and grid.transform.f % 10 == 0 and grid.epsg == 32631
    for tile in tiles:
        col_off, row_off = grid.offsets[tile.name]
        placed_west, placed_north = grid.transform @ (col_off, row_off)
        assert 0 <= tile.transform.c - placed_west < 10
        assert 0 <= placed_north - tile.transform.f < 10
        assert col_off + tile.width <= grid.width and row_off + tile.height <= grid.height
    with pytest.raises(ValueError, match="one CRS"):
        ZoneGrid.for_tiles([Tile.from_name("grid_5.95_52.05"), Tile.from_name("grid_6.05_52.05")])


def _composite(tiles: dict, grid: ZoneGrid) -> np.ndarray:
    """Band 0 of the zone's tiles placed by index, in name order (a later tile's data wins)."""
    expected = np.full((grid.height, grid.width), np.nan, np.float32)
    for name in ZONE31:
        band0 = _dequantised(tiles[name])[..., 0]
        col_off, row_off = grid.offsets[name]
        target = expected[row_off:row_off + band0.shape[0], col_off:col_off + band0.shape[1]]
        target[np.isfinite(band0)] = band0[np.isfinite(band0)]
    return expected


def test_a_pixel_lands_where_it_should(run_dir):
    tiles = {f.tile.name: f for f in find_tiles(Results(run_dir))}
    grid = ZoneGrid.for_tiles([tiles[name].tile for name in ZONE31])
    composite = _composite(tiles, grid)
    with rasterio.open(_mosaic(run_dir, "tessera", 32631)) as mosaic:
        assert mosaic.transform == grid.transform and (mosaic.width, mosaic.height) == (grid.width, grid.height)
        for name in ZONE31:
            files = tiles[name]
            values = _dequantised(files)
            col_off, row_off = grid.offsets[name]
            # A pixel of this tile that no later tile covers (neighbouring tiles overlap a little).
            shown = np.zeros(values.shape[:2], bool)
            shown_view = composite[row_off:row_off + values.shape[0], col_off:col_off + values.shape[1]]
            shown[:shown_view.shape[0], :shown_view.shape[1]] = shown_view == values[:shown_view.shape[0], :shown_view.shape[1], 0]
            candidates = np.argwhere(np.isfinite(values[..., 0]) & shown)
            row, col = candidates[len(candidates) // 2]
            # By index: tile pixel (row, col) is zone pixel (row_off + row, col_off + col), every band exact.
            read = mosaic.read(window=Window(col_off + col, row_off + row, 1, 1))[:, 0, 0]
            np.testing.assert_array_equal(read, values[row, col])
            # By coordinates: the tile pixel's centre, moved by its tile's sub-pixel shift.
            x, y = files.tile.transform @ (col + 0.5, row + 0.5)
            shift_x, shift_y = np.subtract(grid.transform @ (col_off, row_off), (files.tile.transform.c, files.tile.transform.f))
            assert mosaic.index(x + shift_x, y + shift_y) == (row_off + row, col_off + col)
            assert mosaic.index(x, y)[0] in (row_off + row, row_off + row + 1)  # less than a pixel off


def test_no_tile_hides_its_neighbours_data(run_dir):
    tiles = {f.tile.name: f for f in find_tiles(Results(run_dir))}
    grid = ZoneGrid.for_tiles([tiles[name].tile for name in ZONE31])
    expected = _composite(tiles, grid)
    with rasterio.open(_mosaic(run_dir, "tessera", 32631)) as mosaic:
        np.testing.assert_array_equal(mosaic.read(1), expected)
    with rasterio.open(_mosaic(run_dir, "quicklook", 32631)) as quicklook:
        assert [c.name for c in quicklook.colorinterp] == ["red", "green", "blue", "alpha"]
        np.testing.assert_array_equal(quicklook.read(4) == 255, np.isfinite(expected))
        for name in ZONE31:
            col_off, row_off = grid.offsets[name]
            with rasterio.open(Results(run_dir).quicklook(name, YEAR)[1]) as tile_rgb:
                rgba = tile_rgb.read()
            window = Window(col_off, row_off, rgba.shape[2], rgba.shape[1])
            mosaic_rgba = quicklook.read(window=window)
            later = np.zeros((grid.height, grid.width), bool)
            for other in ZONE31[ZONE31.index(name) + 1:]:
                finite = np.isfinite(_dequantised(tiles[other])[..., 0])
                other_col, other_row = grid.offsets[other]
                later[other_row:other_row + finite.shape[0], other_col:other_col + finite.shape[1]] |= finite
            mine = (rgba[3] == 255) & ~later[row_off:row_off + rgba.shape[1], col_off:col_off + rgba.shape[2]]
            np.testing.assert_array_equal(mosaic_rgba[:, mine], rgba[:, mine])


def test_mosaics_move_with_the_output_directory(run_dir, tmp_path):
    moved = Path(shutil.copytree(run_dir, tmp_path / "moved"))
    with rasterio.open(_mosaic(moved, "tessera", 32631)) as mosaic:
        assert all(Path(f).is_relative_to(moved) for f in mosaic.files if f.endswith(".tif"))
        assert np.isfinite(mosaic.read(1)).any()


def test_mosaic_cog_on_request(run_dir, tmp_path):
    vrt = _mosaic(run_dir, "quicklook", 32631)
    cog = write_mosaic_cog(vrt, tmp_path / "quicklook_epsg32631.tif", threads=2)
    with rasterio.open(vrt) as src, rasterio.open(cog) as dst:
        assert dst.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and dst.overviews(1)
        assert dst.transform == src.transform and dst.crs == src.crs
        np.testing.assert_array_equal(dst.read(), src.read())


# --- geotessera, rio-cogeo, rioxarray -------------------------------------------------------------


@pytest.fixture(scope="module")
def geotessera_dir(tmp_path_factory) -> Path:
    """128 dimensions (geotessera 0.7.5 samples into (N, 128) arrays), one tile either side of 6° E."""
    pytest.importorskip("geotessera")
    if (release := version("geotessera")).split(".")[:2] != ["0", "7"]:
        pytest.skip(f"geotessera {release} here: these tests are for 0.7.5 (Python 3.11); "
                    "test_geotessera_current.py reads with 0.10 and later")
    return build_output_dir(tmp_path_factory.mktemp("geotessera"), cogs=False, roi=box(5.99, 52.04, 6.01, 52.06), dims=128)


@pytest.mark.interop
def test_geotessera_fetches_our_tiles_exactly(geotessera_dir, tmp_path):
    from geotessera import GeoTessera

    gt = GeoTessera(embeddings_dir=geotessera_dir, registry_dir=geotessera_dir, cache_dir=tmp_path)
    for files in find_tiles(Results(geotessera_dir)):
        embedding, crs, transform = gt.fetch_embedding(files.tile.lon, files.tile.lat, YEAR)
        np.testing.assert_array_equal(embedding, _dequantised(files))
        assert crs.to_epsg() == files.tile.epsg and transform == files.tile.transform


@pytest.mark.interop
def test_geotessera_samples_points_exactly(geotessera_dir, tmp_path):
    from geotessera import GeoTessera

    gt = GeoTessera(embeddings_dir=geotessera_dir, registry_dir=geotessera_dir, cache_dir=tmp_path)
    points, expected = [], []
    for files in find_tiles(Results(geotessera_dir)):
        values = _dequantised(files)
        to_lonlat = Transformer.from_crs(files.tile.epsg, 4326, always_xy=True)
        # geotessera reads a point from the tile whose 0.1° cell holds it; tiles overlap a little
        # beyond their cells, so ask each tile only for pixels inside its own cell.
        in_cell = rasterize_roi(box(*files.tile.bounds_lonlat), files.tile) > 0
        valid = np.argwhere(np.isfinite(values[..., 0]) & in_cell)
        no_data = np.argwhere(np.isnan(values[..., 0]) & in_cell & (np.arange(values.shape[1]) > 100)[None, :])
        for row, col in [*valid[:: max(1, len(valid) // 5)], no_data[0]]:
            points.append(to_lonlat.transform(*(files.tile.transform @ (col + 0.5, row + 0.5))))
            expected.append(values[row, col])
    sampled = gt.sample_embeddings_at_points(points, year=YEAR, auto_download=False)
    np.testing.assert_array_equal(sampled, np.array(expected))
    assert np.isnan(sampled).all(axis=1).sum() == 2  # the one no-data pixel asked of each tile


@pytest.mark.interop
def test_geotessera_registry_tools_accept_our_directory(geotessera_dir, tmp_path):
    tool = Path(sys.executable).with_name("geotessera-registry")
    check = subprocess.run([str(tool), "check", "--verify-hashes", str(geotessera_dir)], capture_output=True, text=True)
    assert check.returncode == 0 and "All hashes verified" in check.stdout, check.stdout + check.stderr
    # geotessera's own registry of our files agrees with the registry.parquet we wrote.
    scan = subprocess.run([str(tool), "scan", str(geotessera_dir), "--registry-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert (tmp_path / "registry.parquet").exists(), scan.stdout + scan.stderr
    columns = ["year", "lon", "lat", "lon_i", "lat_i", "hash", "scales_hash", "file_size", "scales_size"]
    theirs = pq.read_table(tmp_path / "registry.parquet", columns=columns).to_pylist()
    ours = pq.read_table(geotessera_dir / "registry.parquet", columns=columns).to_pylist()
    key = lambda row: (row["year"], row["lon"], row["lat"])  # noqa: E731
    assert sorted(theirs, key=key) == sorted(ours, key=key)


@pytest.mark.interop
def test_every_cog_passes_rio_cogeo_validate(run_dir, tmp_path):
    cogeo = pytest.importorskip("rio_cogeo.cogeo")
    cogs = [*run_dir.glob("cog/*/*.tif"), *run_dir.glob("quicklook/*/*.tif"),
            write_mosaic_cog(_mosaic(run_dir, "tessera", 32631), tmp_path / "tessera_epsg32631.tif", threads=2)]
    assert len(cogs) == 7
    for cog in cogs:
        # What `rio cogeo validate --strict` runs: warnings (e.g. missing overviews) count as failures.
        assert cogeo.cog_validate(cog, strict=True) == (True, [], []), cog


@pytest.mark.interop
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:rioxarray.rioxarray")  # rioxarray's own use of affine
def test_rioxarray_reads_crs_transform_and_nan_nodata(run_dir):
    rioxarray = pytest.importorskip("rioxarray")
    files = next(f for f in find_tiles(Results(run_dir)) if f.tile.name == "grid_5.95_52.05")
    tile = rioxarray.open_rasterio(Results(run_dir).cog(files.tile.name, YEAR))
    # The COG holds the rows and columns with embeddings, on the tile grid (whole-pixel offset).
    col0, row0 = (round(v) for v in ~files.tile.transform @ (tile.rio.transform().c, tile.rio.transform().f))
    assert tile.rio.crs.to_epsg() == 32631 and tile.rio.transform() == files.tile.window_transform(Window(col0, row0, 1, 1))
    assert np.isnan(tile.rio.nodata) and tile.dims == ("band", "y", "x")
    assert tile.attrs["long_name"][0] == "Tessera_Band_0"
    values = _dequantised(files)[row0:row0 + tile.shape[1], col0:col0 + tile.shape[2]]
    np.testing.assert_array_equal(np.moveaxis(tile.values, 0, -1), values)
    # Pixel-centre coordinates, as xarray users expect.
    x0, y0 = files.tile.window_transform(Window(col0, row0, 1, 1)) @ (0.5, 0.5)
    assert float(tile.x[0]) == x0 and float(tile.y[0]) == y0

    mosaic = rioxarray.open_rasterio(_mosaic(run_dir, "tessera", 32631), masked=True)
    grid = ZoneGrid.for_tiles([Tile.from_name(name) for name in ZONE31])
    assert mosaic.rio.crs.to_epsg() == 32631 and mosaic.rio.transform() == grid.transform
    col_off, row_off = grid.offsets[files.tile.name]
    row_off, col_off = row_off + row0, col_off + col0
    np.testing.assert_array_equal(
        mosaic.values[:, row_off:row_off + tile.shape[1], col_off:col_off + tile.shape[2]][:, np.isfinite(tile.values[0])],
        tile.values[:, np.isfinite(tile.values[0])])
