"""`tessera compare`: two output directories in geotessera's layout, tile by tile, offline."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tessera.cli import main
from tessera.compare import compare
from tessera.grid import Tile
from tessera.layout import Results, TileFiles

TILES = ("grid_0.15_52.05", "grid_0.25_52.05")
H, W, D = 20, 30, 16


def write_tile(out: Path, name: str, codes: np.ndarray, scales: np.ndarray, year: int = 2024) -> None:
    files = TileFiles.locate(Results(out), Tile.from_name(name), year)
    files.embedding.parent.mkdir(parents=True, exist_ok=True)
    np.save(files.embedding, codes.astype(np.int8))
    np.save(files.scales, scales.astype(np.float32))


def tile_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, (H, W, D)).astype(np.int8)
    scales = rng.uniform(0.001, 0.01, (H, W)).astype(np.float32)
    scales[0, :5] = np.nan  # our no-data
    return codes, scales


@pytest.fixture
def ours(tmp_path) -> Path:
    out = tmp_path / "ours"
    for seed, name in enumerate(TILES):
        write_tile(out, name, *tile_arrays(seed))
    return out


def test_a_directory_compared_with_a_copy_of_itself_agrees_everywhere(ours, tmp_path, capsys):
    copy = Path(shutil.copytree(ours, tmp_path / "copy"))
    histogram = tmp_path / "hist.png"
    assert main(["compare", str(ours), str(copy), "--histogram", str(histogram), "--min-cosine", "0.9999"]) == 0
    out = capsys.readouterr().out
    results, (low, high) = compare(ours, copy, histogram=histogram)
    assert [r.tile for r in results] == list(TILES)
    for r in results:
        assert r.pixels == H * W - 5 and r.only_a == r.only_b == 0
        assert r.median == pytest.approx(1, abs=1e-6) and r.p1 == pytest.approx(1, abs=1e-6)
        assert r.minimum == pytest.approx(1, abs=1e-6) and r.within_storage_error == 1.0
        assert r.line() in out
    assert high == 1.0 and low == pytest.approx(0.9)
    with rasterio.open(histogram) as png:
        assert png.driver == "PNG" and png.read(1).min() < 255  # bars were drawn


def test_differences_are_measured_on_common_pixels(ours, tmp_path):
    other = tmp_path / "published"
    codes, scales = tile_arrays(0)
    codes = codes.astype(np.int16)
    codes[1] += np.where(codes[1] > 0, -2, 2)  # row 1: two quantisation steps off, beyond int8 error
    codes[2, 0] = -codes[2, 0]  # one pixel the opposite embedding
    codes[3] += np.where(codes[3] > 0, -1, 1)  # row 3: one step off, within storage error
    published_scales = scales.copy()
    published_scales[0, :5] = 1e-3  # published embeds pixels we left out...
    published_scales[4, :3] = 0  # ...and leaves out (scale 0) pixels we embed
    write_tile(other, TILES[0], codes, published_scales)
    write_tile(other, "grid_0.35_52.05", *tile_arrays(5))  # not in ours: ignored
    results, _ = compare(ours, other, histogram=tmp_path / "h.png")
    assert len(results) == 1
    r = results[0]
    assert r.tile == TILES[0] and r.pixels == H * W - 5 - 3 and r.only_a == 3 and r.only_b == 5
    assert r.minimum == pytest.approx(-1, abs=1e-6) and r.median == pytest.approx(1, abs=1e-6)
    assert r.within_storage_error == pytest.approx((r.pixels - W - 1) / r.pixels)  # row 1 and pixel (2, 0)
    assert 0.9 < r.p1 < 1


def test_threshold_and_nothing_in_common_end_with_a_non_zero_status(ours, tmp_path, capsys):
    unrelated = tmp_path / "unrelated"
    for seed, name in enumerate(TILES):
        write_tile(unrelated, name, *tile_arrays(seed + 10))
    assert main(["compare", str(ours), str(unrelated), "--histogram", str(tmp_path / "h.png")]) == 0
    assert main(["compare", str(ours), str(unrelated), "--histogram", str(tmp_path / "h.png"),
                 "--min-cosine", "0.5"]) == 1
    assert "median cosine" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(ours), str(empty), "--histogram", str(tmp_path / "h.png")]) == 2
    assert "no tile-year in common" in capsys.readouterr().err
