"""The Zarr store in geotessera's tessera.zarr layout, read the way users read it (xarray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr

from tessera.grid import Tile
from tessera.layout import Results
from tessera.publish.zarr_store import GEOEMB_CONVENTION, SHARD_SIZE


@pytest.fixture(scope="module")
def store(tiny_demo_run):
    workdir, _, _ = tiny_demo_run
    results = Results(workdir / "results")
    return results, results.zarr_store


def test_root_and_zone_groups_carry_geotessera_conventions(store):
    _, path = store
    root = zarr.open_group(str(path), mode="r")
    attrs = root.attrs.asdict()
    assert attrs["zarr_conventions"] == [GEOEMB_CONVENTION]
    assert attrs["geoemb:dimensions"] == 128 and attrs["geoemb:data_type"] == "int8"
    assert attrs["geoemb:spatial_layout"] == "utm_zones" and attrs["geoemb:model"] == "https://geotessera.org/model/2.0"
    assert attrs["geoemb:quantization"]["scale"] == {"type": "array", "array_name": "scales", "nodata": "+inf"}
    assert sorted(root.group_keys()) == ["utm31", "utm32"]  # the demo's two tiles either side of 6°E
    for zone in ("utm31", "utm32"):
        group = root[zone]
        zone_attrs = group.attrs.asdict()
        assert zone_attrs["proj:code"] == f"EPSG:326{zone[-2:]}"
        assert {c["name"] for c in zone_attrs["zarr_conventions"]} == {"spatial", "proj"}
        embeddings = group["embeddings"]
        assert embeddings.dtype == np.int8 and embeddings.metadata.dimension_names == ("time", "band", "y", "x")
        assert embeddings.chunks == (1, 128, 32, 32) and embeddings.shards == (1, 128, SHARD_SIZE, SHARD_SIZE)
        assert group["scales"].dtype == np.float32 and group["scales"].fill_value == np.inf
        assert embeddings.shape[2] % SHARD_SIZE == 0 and embeddings.shape[3] % SHARD_SIZE == 0
    assert json.loads((path / "zarr.json").read_text())["consolidated_metadata"] is not None


def test_values_and_pixel_positions_match_the_tile_cogs(store):
    results, path = store
    cogs = sorted(results.root.glob("cog/2024/*.tif"))
    assert len(cogs) == 2
    for cog in cogs:
        tile = Tile.from_name(cog.name.rsplit("_", 1)[0])
        ds = xr.open_zarr(path, group=f"utm{tile.epsg % 100:02d}")
        assert list(ds["embeddings"].dims) == ["time", "band", "y", "x"] and list(ds["time"].values) == [2024]
        transform = ds.attrs["spatial:transform"]
        assert ds["x"].values[0] == transform[2] + 5 and ds["y"].values[0] == transform[5] - 5
        with rasterio.open(cog) as src:
            values = src.read()  # (B, h, w) float32, NaN = no embedding
            rows, cols = np.nonzero(np.isfinite(values[0]))
            xs, ys = rasterio.transform.xy(src.transform, rows, cols)  # pixel centres
        south = 10_000_000 if tile.epsg >= 32700 else 0  # the store's zones have one northing axis
        xs, ys = np.asarray(xs), np.asarray(ys) - south
        # Each COG pixel's store pixel: the COG pixel moved less than a pixel west and north onto
        # the 10 m lattice, by the same amount for every pixel of a tile (a whole-pixel placement).
        col = np.floor((xs - ds["x"].values[0]) / 10 + 1e-9).astype(int)
        row = np.floor((ds["y"].values[0] - ys) / 10 + 1e-9).astype(int)
        dx, dy = xs - ds["x"].values[col], ds["y"].values[row] - ys
        assert (dx >= 0).all() and (dx < 10).all() and (dy >= 0).all() and (dy < 10).all()
        assert np.ptp(dx) < 1e-6 and np.ptp(dy) < 1e-6
        assert dx[0] == pytest.approx((tile.transform.c - transform[2]) % 10)
        assert dy[0] == pytest.approx((transform[5] - (tile.transform.f - south)) % 10)
        codes = ds["embeddings"].isel(time=0).values[:, row, col]
        scales = ds["scales"].isel(time=0).values[row, col]
        np.testing.assert_array_equal(codes.astype(np.float32) * scales, values[:, rows, cols])
        # Everywhere else in the zone: no embedding (+inf), zero codes.
        outside = np.ones(ds["scales"].shape[1:], bool)
        outside[row, col] = False
        assert np.isinf(ds["scales"].isel(time=0).values[outside]).all()


def test_tiles_either_side_of_the_equator_share_one_zone_axis(tmp_path):
    """A zone's group holds its northern and southern tiles on one northing axis (south - 10,000 km)."""
    from tessera.layout import TileFiles
    from tessera.publish.zarr_store import write_zarr_store

    results = Results(tmp_path / "results")
    rng = np.random.default_rng(0)
    files = []
    for name in ("grid_3.05_0.05", "grid_3.05_-0.05"):
        tile = Tile.from_name(name)
        f = TileFiles.locate(results, tile, 2024)
        f.embedding.parent.mkdir(parents=True, exist_ok=True)
        codes = rng.integers(-128, 128, (tile.height, tile.width, 16), dtype=np.int8)
        scales = np.full((tile.height, tile.width), np.nan, np.float32)
        scales[:40, 10:50] = rng.uniform(0.01, 0.02, (40, 40)).astype(np.float32)
        np.save(f.embedding, codes)
        np.save(f.scales, scales)
        f.landmask.parent.mkdir(parents=True, exist_ok=True)
        f.landmask.write_bytes(b"")  # not read here
        files.append((f, codes, scales))
    write_zarr_store(results, [f for f, _, _ in files], dataset_version="2.0")
    assert sorted(zarr.open_group(str(results.zarr_store), mode="r").group_keys()) == ["utm31"]
    ds = xr.open_zarr(results.zarr_store, group="utm31")
    assert ds.attrs["proj:code"] == "EPSG:32631" and ds.sizes["band"] == 16
    for f, codes, scales in files:
        tile = f.tile
        top = tile.transform.f - (10_000_000 if tile.epsg >= 32700 else 0)
        row = int(np.floor((ds["y"].values[0] + 5 - top) / 10 + 1e-9))  # the row whose footprint holds the top edge
        col = int(np.floor((tile.transform.c - (ds["x"].values[0] - 5)) / 10 + 1e-9))
        assert 0 <= ds["y"].values[row] + 5 - top < 10  # moved north by less than a pixel
        stored = ds["embeddings"].isel(time=0, y=slice(row, row + 40), x=slice(col + 10, col + 50)).values
        np.testing.assert_array_equal(stored, np.moveaxis(codes[:40, 10:50], -1, 0))
        np.testing.assert_array_equal(ds["scales"].isel(time=0, y=slice(row, row + 40), x=slice(col + 10, col + 50)),
                                      scales[:40, 10:50])
    south_row = int(np.floor((ds["y"].values[0] + 5 - 0.0) / 10))
    assert ds["y"].values[south_row] == pytest.approx(-5.0)  # the equator is northing 0 on the zone's axis
