"""The demo's outputs read by the current geotessera (0.10 and later), offline, against our COGs.

Both its readers: GeoTessera on the directory of NPY tiles, and GeoTesseraZarr (geotessera.store)
and its CLI's `download --source zarr --store-url` on results/tessera.zarr.

geotessera 0.8+ needs Python >= 3.12, so it runs in another interpreter: tests/read_with_geotessera.py,
run by $TESSERA_PY313 (a Python with geotessera >= 0.10, e.g. .venv-3.13/bin/python after
`make PYTHON=python3.13 install`), or by this interpreter when its own geotessera is that recent.
Skipped, with that reason, when there is none; CI sets TESSERA_PY313. geotessera 0.7.5 on
Python 3.11 is tests/test_publish_interop.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.warp import transform_bounds
from shapely import box

from tessera.layout import Results, TileFiles, find_tiles
from tessera.roi import rasterize_roi

HELPER = Path(__file__).with_name("read_with_geotessera.py")
DEMO_TILES = ["2024/grid_5.95_52.05", "2024/grid_6.05_52.05"]


def _minor(release: str) -> tuple[int, int]:
    major, minor = release.split(".")[:2]
    return int(major), int(minor)


def _reader() -> str | None:
    """The interpreter that reads with the current geotessera, or None."""
    if os.environ.get("TESSERA_PY313"):
        return os.environ["TESSERA_PY313"]
    try:
        here = version("geotessera")
    except PackageNotFoundError:
        return None
    return sys.executable if _minor(here) >= (0, 10) else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.interop,
    pytest.mark.skipif(
        _reader() is None,
        reason="needs a Python with geotessera >= 0.10 (Python >= 3.12): set TESSERA_PY313 to one, "
               "e.g. .venv-3.13/bin/python after `make PYTHON=python3.13 install`",
    ),
]


class Cog:
    """A tile's COG placed on its tile grid: values (h, w, D) from pixel (row0, col0) of the tile."""

    def __init__(self, results: Path, files: TileFiles):
        with rasterio.open(Results(results).cog(files.tile.name, files.year)) as cog:
            self.values = np.moveaxis(cog.read(), 0, -1)
            self.transform, self.epsg = cog.transform, cog.crs.to_epsg()
        col0, row0 = ~files.tile.transform @ (self.transform.c, self.transform.f)
        self.row0, self.col0 = round(row0), round(col0)

    def at(self, row: int, col: int) -> np.ndarray:
        """The value at tile pixel (row, col); NaN outside the COG."""
        r, c = row - self.row0, col - self.col0
        if 0 <= r < self.values.shape[0] and 0 <= c < self.values.shape[1]:
            return self.values[r, c]
        return np.full(self.values.shape[2], np.nan, np.float32)


def _points(results: Path) -> tuple[list[tuple[float, float]], list[np.ndarray]]:
    """Pixel centres with embeddings (and one without) in each tile's own 0.1° cell, and their COG values.

    geotessera reads a point from the tile whose cell holds it; tiles overlap a little beyond their cells.
    """
    points, expected = [], []
    for files in find_tiles(Results(results)):
        cog = Cog(results, files)
        in_cell = rasterize_roi(box(*files.tile.bounds_lonlat), files.tile) > 0
        has_value = np.zeros(in_cell.shape, bool)
        has_value[cog.row0:cog.row0 + cog.values.shape[0], cog.col0:cog.col0 + cog.values.shape[1]] = \
            np.isfinite(cog.values[..., 0])
        # The pixel without an embedding is 3 pixels or more from any with one: for a point on a
        # pixel without an embedding, GeoTesseraZarr answers with a valid pixel within 1 pixel.
        near_value = np.zeros_like(has_value)
        for dr in range(-2, 3):
            for dc in range(-2, 3):
                near_value |= np.roll(has_value, (dr, dc), axis=(0, 1))
        valid, empty = np.argwhere(has_value & in_cell), np.argwhere(~near_value & in_cell)
        to_lonlat = Transformer.from_crs(files.tile.epsg, 4326, always_xy=True)
        for row, col in [*valid[:: max(1, len(valid) // 6)], empty[len(empty) // 2]]:
            points.append(to_lonlat.transform(*(files.tile.transform @ (col + 0.5, row + 0.5))))
            expected.append(cog.at(row, col))
    return points, expected


def _regions(results: Path) -> list[list[float]]:
    """Per tile-year (find_tiles order): a lon/lat bbox around its COG, 0.0005° (30-50 m) beyond it,
    widened to have its centre in the tile's UTM zone (GeoTesseraZarr.read_region reads the zone of
    the bbox's centre; the demo's COGs reach across 6°E, both ways)."""
    regions = []
    for files in find_tiles(Results(results)):
        cog = Cog(results, files)
        height, width = cog.values.shape[:2]
        west, south, east, north = transform_bounds(
            f"EPSG:{cog.epsg}", "EPSG:4326", *(cog.transform @ (0, height)), *(cog.transform @ (width, 0)),
            densify_pts=21)
        west, south, east, north = west - 5e-4, south - 5e-4, east + 5e-4, north + 5e-4
        zone_west = (files.tile.epsg % 100) * 6 - 186
        west = min(west, 2 * (zone_west + 6) - east - 1e-3)
        east = max(east, 2 * zone_west - west + 1e-3)
        regions.append([west, south, east, north])
    return regions


def _cogs_on_grid(results: Path, zone: int, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """The values the Zarr store should hold on a grid of its zone (``transform`` in EPSG 326zz).

    Each COG pixel of the zone's tiles lands on the store pixel holding its centre moved less than a
    pixel west and north (the store's whole-pixel placement); where tiles overlap, the one later in
    name order where it has a value. NaN elsewhere.
    """
    assert transform.a == -transform.e == 10 and transform.b == transform.d == 0, transform
    expected = None
    for files in sorted(find_tiles(Results(results)), key=lambda f: f.tile.name):
        if files.tile.epsg % 100 != zone:
            continue
        cog = Cog(results, files)
        if expected is None:
            expected = np.full((*shape, cog.values.shape[2]), np.nan, np.float32)
        rows, cols = np.nonzero(np.isfinite(cog.values[..., 0]))
        xs, ys = cog.transform @ (cols + 0.5, rows + 0.5)
        ys = ys - (10_000_000 if cog.epsg >= 32700 else 0)  # the store's zones have one northing axis
        col = np.floor((xs - (transform.c + 5)) / 10 + 1e-9).astype(int)
        row = np.floor(((transform.f - 5) - ys) / 10 + 1e-9).astype(int)
        inside = (row >= 0) & (row < shape[0]) & (col >= 0) & (col < shape[1])
        expected[row[inside], col[inside]] = cog.values[rows[inside], cols[inside]]
    assert expected is not None, f"no tile in zone {zone}"
    return expected


@pytest.fixture(scope="module")
def read(tiny_demo_run, tmp_path_factory):
    """What the current geotessera returns for the tiny demo run's results/."""
    workdir, _, _ = tiny_demo_run
    results = workdir / "results"
    out = tmp_path_factory.mktemp("geotessera-current")
    points, expected = _points(results)
    regions = _regions(results)
    export_bbox = [min(r[0] for r in regions), min(r[1] for r in regions),
                   max(r[2] for r in regions), max(r[3] for r in regions)]
    (out / "points.json").write_text(json.dumps({"year": 2024, "points": points, "regions": regions,
                                                 "export_bbox": export_bbox}))
    python = _reader()
    run = subprocess.run([python, str(HELPER), str(results), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{python} {HELPER}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return results, out, json.loads((out / "report.json").read_text()), np.array(expected)


def test_current_geotessera_reads_our_directory_offline(read):
    results, _, report, _ = read
    assert _minor(report["geotessera"]) >= (0, 10), f"{_reader()} has geotessera {report['geotessera']}"
    assert report["network_attempts"] == []
    # Its manifest lists every demo tile, and its spatial index finds them; its landmask registry is ours.
    assert sorted(report["tiles"]) == DEMO_TILES == [f"{t.year}/{t.tile.name}" for t in find_tiles(Results(results))]
    assert report["in_region"] == DEMO_TILES
    for files in find_tiles(Results(results)):
        assert report["tiles"][f"{files.year}/{files.tile.name}"]["landmask_size"] == files.landmask.stat().st_size


def test_current_geotessera_fetches_our_cog_values_exactly(read):
    results, out, report, _ = read
    for files in find_tiles(Results(results)):
        key = f"{files.year}/{files.tile.name}"
        theirs, cog = report["tiles"][key], Cog(results, files)
        fetched = np.load(out / f"{files.year}_{files.tile.name}.npy")
        assert theirs["shape"] == [files.tile.height, files.tile.width, cog.values.shape[2]], key
        # Every value geotessera returns lies in the COG's window, at the same pixels, bit for bit.
        assert theirs["finite"] == np.isfinite(fetched).sum() == np.isfinite(cog.values).sum() > 0, key
        row, col = theirs["offset"]
        window = cog.values[row - cog.row0:row - cog.row0 + fetched.shape[0], col - cog.col0:col - cog.col0 + fetched.shape[1]]
        np.testing.assert_array_equal(fetched, window, err_msg=key)
        # Its georeferencing (from our landmask) puts those pixels where the COG puts them.
        assert theirs["epsg"] == cog.epsg == files.tile.epsg, key
        placed = Affine(*theirs["transform"]) @ Affine.translation(cog.col0, cog.row0)
        np.testing.assert_allclose(list(placed)[:6], list(cog.transform)[:6], rtol=0, atol=1e-6, err_msg=key)


def test_current_geotessera_samples_our_cog_values_exactly(read):
    _, out, _, expected = read
    sampled = np.load(out / "sampled.npy")
    np.testing.assert_array_equal(sampled, expected)
    assert np.isnan(sampled).all(axis=1).sum() == len(DEMO_TILES)  # the one no-data pixel asked of each tile
    assert np.isfinite(sampled).all(axis=1).sum() == len(expected) - len(DEMO_TILES)


def test_current_geotessera_opens_our_zarr_store_offline(read):
    results, _, report, _ = read
    sidecar = json.loads((results / "tessera_metadata.json").read_text())
    assert report["network_attempts"] == []
    assert report["zarr"]["years"] == [2024] and report["zarr"]["n_bands"] == 128
    assert report["zarr"]["model"] == f"https://geotessera.org/model/{sidecar['dataset_version']}"


def test_current_geotessera_reads_regions_of_our_zarr_store_as_the_cogs(read):
    """GeoTesseraZarr.read_region around each tile: its COG's values at the store's pixels, NaN elsewhere."""
    results, out, report, _ = read
    for i, files in enumerate(find_tiles(Results(results))):
        zone, region = files.tile.epsg % 100, report["zarr"]["regions"][i]
        mosaic = np.load(out / f"zarr_region_{i}.npy")
        assert region["crs"] == f"EPSG:{32600 + zone}"
        transform = Affine(*region["transform"])
        assert transform.c % 10 == 0 and transform.f % 10 == 0  # on the store's 10 m lattice
        np.testing.assert_array_equal(mosaic, _cogs_on_grid(results, zone, transform, mosaic.shape[:2]),
                                      err_msg=f"{files.year}/{files.tile.name}")
        # All of the COG's values are in the region, and nothing else (pixels without embeddings are NaN).
        assert np.isfinite(mosaic).sum() == np.isfinite(Cog(results, files).values).sum() > 0


def test_current_geotessera_samples_our_zarr_store_as_the_cogs(read):
    """GeoTesseraZarr.sample_points at COG pixel centres: the COG values; NaN where there is no embedding."""
    results, out, report, expected = read
    # It answers a point with the store pixel nearest to it. The store has each COG pixel moved less
    # than a pixel west and north onto its lattice; for the demo's tiles by less than half a pixel, so
    # a COG pixel's centre lies in that pixel's own store pixel.
    for i, files in enumerate(find_tiles(Results(results))):
        grid, cog = Affine(*report["zarr"]["regions"][i]["transform"]), Cog(results, files)
        north = cog.transform.f - (10_000_000 if cog.epsg >= 32700 else 0)
        assert (cog.transform.c - grid.c) % 10 < 5 and (grid.f - north) % 10 < 5, files.tile.name
    sampled = np.load(out / "zarr_sampled.npy")
    np.testing.assert_array_equal(sampled, expected)
    assert np.isnan(sampled).all(axis=1).sum() == len(DEMO_TILES)  # the one no-data pixel asked of each tile


def test_current_geotessera_cli_exports_our_zarr_store_as_the_cogs(read):
    """`geotessera download --source zarr --store-url results/tessera.zarr`: a GeoTIFF per zone, the COGs' values.

    Each zone's file is that zone's part of the bbox (west and east of 6°E for the demo), so holds a
    part of the zone's COG.
    """
    results, out, report, _ = read
    tiles = find_tiles(Results(results))
    zones = sorted({files.tile.epsg % 100 for files in tiles})
    assert report["zarr"]["export_exit"] == 0
    assert report["zarr"]["exported"] == [f"tessera_2024_utm{zone:02d}.tif" for zone in zones]
    for zone in zones:
        with rasterio.open(out / "zarr_export" / f"tessera_2024_utm{zone:02d}.tif") as tif:
            assert tif.crs.to_epsg() == 32600 + zone and tif.count == 128
            values, transform = np.moveaxis(tif.read(), 0, -1), tif.transform
        np.testing.assert_array_equal(values, _cogs_on_grid(results, zone, transform, values.shape[:2]),
                                      err_msg=f"utm{zone:02d}")
        assert np.isfinite(values[..., 0]).any()
