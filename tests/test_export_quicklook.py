"""PCA quicklooks (tessera.export.quicklook) on tiles whose principal axes are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from tessera.errors import UserError
from tessera.export.geotessera import TileFiles
from tessera.export.quicklook import PcaBasis, fit_pca, quicklook_paths, write_tile_quicklook
from tessera.grid import Tile

DIMS = 8
SCALE = np.float32(0.004)
# Orthonormal axes: tile A varies along AXES[0] (large spread), tile B along AXES[1] (smaller spread),
# and both a little along AXES[2].
AXES = np.linalg.qr(np.random.default_rng(3).normal(size=(DIMS, 3)))[0].T


def _write_tile(out: Path, name: str, spreads: tuple[float, float, float], filled_rows: slice) -> TileFiles:
    """int8 codes + scales of a tile whose pixels in ``filled_rows`` lie on the given axes; NaN scale elsewhere."""
    files = TileFiles.locate(out, Tile.from_name(name), 2024)
    height, width = files.tile.height, files.tile.width
    rng = np.random.default_rng(sum(map(ord, name)))
    coefficients = rng.normal(size=(height, width, 3)) * np.asarray(spreads)
    values = coefficients @ AXES + 0.1
    codes = np.clip(np.rint(values / SCALE), -127, 127).astype(np.int8)
    scales = np.full((height, width), np.nan, np.float32)
    scales[filled_rows] = SCALE
    codes[~np.isfinite(scales)] = 0
    files.embedding.parent.mkdir(parents=True)
    np.save(files.embedding, codes)
    np.save(files.scales, scales)
    return files


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[TileFiles]:
    out = tmp_path_factory.mktemp("quicklook")
    return [
        _write_tile(out, "grid_5.85_52.05", (0.12, 0.0, 0.02), slice(100, 700)),
        _write_tile(out, "grid_5.95_52.05", (0.0, 0.06, 0.02), slice(300, 1000)),
    ]


def test_pca_finds_the_axes_of_every_tile_in_order_with_fixed_signs(tiles):
    basis = fit_pca(tiles, max_pixels=20_000)
    alignment = np.abs(basis.components @ AXES.T)
    np.testing.assert_allclose(alignment, np.eye(3), atol=0.03)  # axis 1 only exists in the second tile
    largest = np.abs(basis.components).argmax(axis=1)
    assert (basis.components[np.arange(3), largest] > 0).all()
    np.testing.assert_allclose(basis.mean, 0.1, atol=0.01)


def test_pca_is_deterministic_and_round_trips(tiles, tmp_path):
    basis = fit_pca(tiles, max_pixels=5_000, seed=11)
    again = fit_pca(tiles, max_pixels=5_000, seed=11)
    other_seed = fit_pca(tiles, max_pixels=5_000, seed=12)
    for name in ("mean", "components", "low", "high"):
        np.testing.assert_array_equal(getattr(basis, name), getattr(again, name))
    assert not np.array_equal(basis.low, other_seed.low)
    basis.save(tmp_path / "pca.json")
    loaded = PcaBasis.load(tmp_path / "pca.json")
    for name in ("mean", "components", "low", "high"):
        np.testing.assert_array_equal(getattr(basis, name), getattr(loaded, name))


def test_too_few_pixels_is_a_user_error(tmp_path):
    empty = _write_tile(tmp_path, "grid_6.05_52.05", (0.1, 0.1, 0.1), slice(0, 0))
    with pytest.raises(UserError, match="0 embedded pixel"):
        fit_pca([empty])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the PNG is a picture, not a map
def test_tile_quicklook_png_and_cog(tiles, tmp_path):
    basis = fit_pca(tiles)
    files = tiles[0]
    png, cog = quicklook_paths(tmp_path, files.tile.name, 2024)
    write_tile_quicklook(files, basis, png, cog)
    assert sorted(p.name for p in png.parent.iterdir()) == [png.name, cog.name]  # no staging or .aux.xml left

    scales = np.load(files.scales)
    valid = np.isfinite(scales)
    codes = np.load(files.embedding)
    with rasterio.open(png) as picture:
        assert picture.driver == "PNG" and picture.count == 4 and picture.dtypes[0] == "uint8"
        rgba = np.moveaxis(picture.read(), 0, -1)
    assert rgba.shape == (files.tile.height, files.tile.width, 4)
    np.testing.assert_array_equal(rgba[..., 3], np.where(valid, 255, 0))
    assert (rgba[~valid] == 0).all()
    row, col = 400, 321
    expected = basis.to_rgb(codes[row, col].astype(np.float32) * scales[row, col])
    np.testing.assert_array_equal(rgba[row, col, :3], expected)
    # The 2–98 % stretch: about 2 % of the pixels sit at each end of the first component's range.
    red = rgba[..., 0][valid]
    assert 0.005 < (red == 0).mean() < 0.06 and 0.005 < (red == 255).mean() < 0.06

    with rasterio.open(cog) as rgb:
        assert rgb.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert rgb.count == 4 and rgb.dtypes == ("uint8",) * 4
        assert [c.name for c in rgb.colorinterp] == ["red", "green", "blue", "alpha"]
        assert rgb.crs.to_epsg() == files.tile.epsg and rgb.transform == files.tile.transform
        assert rgb.overviews(1), "a COG quicklook needs overviews"
        np.testing.assert_array_equal(np.moveaxis(rgb.read(), 0, -1), rgba)
