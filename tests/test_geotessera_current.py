"""The demo's outputs read by the current geotessera (0.10 and later), offline, against our COGs.

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
        valid, empty = np.argwhere(has_value & in_cell), np.argwhere(~has_value & in_cell)
        to_lonlat = Transformer.from_crs(files.tile.epsg, 4326, always_xy=True)
        for row, col in [*valid[:: max(1, len(valid) // 6)], empty[len(empty) // 2]]:
            points.append(to_lonlat.transform(*(files.tile.transform @ (col + 0.5, row + 0.5))))
            expected.append(cog.at(row, col))
    return points, expected


@pytest.fixture(scope="module")
def read(tiny_demo_run, tmp_path_factory):
    """What the current geotessera returns for the tiny demo run's results/."""
    workdir, _, _ = tiny_demo_run
    results = workdir / "results"
    out = tmp_path_factory.mktemp("geotessera-current")
    points, expected = _points(results)
    (out / "points.json").write_text(json.dumps({"year": 2024, "points": points}))
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
