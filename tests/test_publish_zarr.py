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
    results, path = store
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
