"""Assembling patch embeddings into a geotessera tile: quantisation, Matryoshka prefixes, float32."""

import numpy as np
import pytest
from shapely import box

from tessera.assemble import quantise_tile, quantize
from tessera.errors import UserError
from tessera.grid import tile_at
from tessera.layout import write_patch_embedding
from tessera.roi import write_roi_mask


@pytest.fixture
def one_patch(tmp_path):
    tile = tile_at(6.05, 52.05)
    roi_mask = write_roi_mask(box(6.01, 52.01, 6.02, 52.02), tile, tmp_path / "roi.tif")
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(8, 6, 128)).astype(np.float32)
    embedding[0, 0] = np.nan  # a pixel never observed
    patch = tmp_path / "patches" / "r600_c300.npz"
    write_patch_embedding(patch, embedding)
    return tile, roi_mask, patch, embedding


def _assemble(tmp_path, tile, roi_mask, patch, **options):
    out = tmp_path / "out"
    paths = dict(embedding_path=out / "t.npy", scales_path=out / "t_scales.npy", checksums_path=out / "SHA256")
    quantise_tile(tile.name, [patch], family="v2", **paths, **options)
    return np.load(paths["embedding_path"]), np.load(paths["scales_path"])


def test_codes_and_scales_land_on_the_patch_window(tmp_path, one_patch):
    tile, roi_mask, patch, embedding = one_patch
    codes, scales = _assemble(tmp_path, tile, roi_mask, patch)
    expected_codes, expected_scales = quantize(embedding, "v2")
    np.testing.assert_array_equal(codes[600:608, 300:306], expected_codes)
    np.testing.assert_array_equal(scales[600:608, 300:306], expected_scales)
    assert np.isnan(scales[600, 300]) and (codes[600, 300] == 0).all()
    assert np.isnan(np.delete(scales.ravel(), np.ravel_multi_index(np.mgrid[600:608, 300:306].reshape(2, -1), scales.shape))).all()


def test_matryoshka_prefix_is_quantised_over_the_prefix_and_float32_is_kept(tmp_path, one_patch):
    tile, roi_mask, patch, embedding = one_patch
    floats = tmp_path / "out" / "t_float32.npy"
    codes, scales = _assemble(tmp_path, tile, roi_mask, patch, dims=32, float32_path=floats)
    assert codes.shape == (tile.height, tile.width, 32)
    expected_codes, expected_scales = quantize(embedding[..., :32], "v2")
    np.testing.assert_array_equal(codes[600:608, 300:306], expected_codes)
    np.testing.assert_array_equal(scales[600:608, 300:306], expected_scales)
    kept = np.load(floats)
    np.testing.assert_array_equal(kept[600:608, 300:306], embedding[..., :32])
    assert np.isnan(kept[0, 0]).all()


@pytest.mark.parametrize("family, dims, message", [("v1.1", 32, "Matryoshka"), ("v2", 48, "not one of")])
def test_bad_prefix_requests(tmp_path, one_patch, family, dims, message):
    tile, roi_mask, patch, _ = one_patch
    with pytest.raises(UserError, match=message):
        quantise_tile(tile.name, [patch], family=family, embedding_path=tmp_path / "e.npy",
                      scales_path=tmp_path / "s.npy", checksums_path=tmp_path / "S",
                      dims=dims)
    assert not (tmp_path / "e.npy").exists()
