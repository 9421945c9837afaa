"""The infer stage: embedding the patches of a tile's stack (seeds follow tile pixels, not the patch layout) and
exporting them in the reference per-patch layout, which embed_reference_patch reads back."""

import datetime as dt

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from tessera.errors import UserError
from tessera.grid import Tile, patches
from tessera.models import get_family
from tessera.infer import embed_reference_patch, export_patches, infer_patches, tile_seed
from tessera.layout import read_patch_embedding, reference_patch_name
from tessera.options import InferOptions
from tessera.stack import read_window, write_s1, write_s2, write_stack_index, Preprocessing, StackGrid

TILE = Tile.from_name("grid_6.05_52.05")
WINDOW = Window(100, 200, 30, 20)  # the work window, in tile pixels
WINDOW_TRANSFORM = TILE.window_transform(WINDOW)
STEPS = 50


@pytest.fixture(scope="module")
def tile(tmp_path_factory):
    """A stack index over WINDOW with 50 S2 and 2 × 12 S1 dates, and the tile's ROI mask (a disc)."""
    root = tmp_path_factory.mktemp("tile")
    grid = StackGrid(tile=TILE.name, year=2024, window=WINDOW, crs=f"EPSG:{TILE.epsg}", transform=WINDOW_TRANSFORM,
                     source="demo", data_kind="mpc",
                     preprocessing=Preprocessing.expected_by("v1.0", "mpc"))
    rng = np.random.default_rng(0)
    with write_s2(root / "s2.zarr", grid, chunk=8) as writer:
        for step in range(STEPS):
            bands = rng.integers(1, 10000, (20, 30, 10), dtype=np.uint16)
            writer.append(dt.date(2024, 1, 1) + dt.timedelta(days=7 * step), [f"s2-{step}"], bands,
                          (rng.random((20, 30)) < 0.7).astype(np.uint8))
    with write_s1(root / "s1.zarr", grid, chunk=8) as writer:
        for orbit, first_day in (("ascending", 3), ("descending", 5)):
            for step in range(12):
                sar = rng.integers(1000, 9000, (20, 30, 2), dtype=np.int16)
                sar[rng.random((20, 30)) < 0.2] = 0
                writer.append(orbit, dt.date(2024, 1, first_day) + dt.timedelta(days=30 * step), [f"{orbit}-{step}"], sar)
    write_stack_index(root / "s2.zarr", root / "s1.zarr", root / "stack.json")
    rows, cols = np.mgrid[:TILE.height, :TILE.width]
    roi = (rows - 204) ** 2 + (cols - 112) ** 2 < 5**2  # a disc inside the window, at its top edge
    profile = dict(driver="GTiff", width=TILE.width, height=TILE.height, count=1, dtype="uint8", crs=TILE.crs,
                   transform=TILE.transform)
    with rasterio.open(root / "roi.tif", "w", **profile) as dst:
        dst.write(roi.astype(np.uint8), 1)
    return root


def _tiny_checkpoint(path, family):
    """A v1.x checkpoint of a few thousand seeded weights that records its architecture."""
    chosen = get_family(family)
    arch = {"latent_dim": 4, "nhead": 2, "num_layers": 1, "dim_feedforward": 16}
    torch.manual_seed(0)
    model = chosen.build(**arch)
    torch.save(chosen.checkpoint_payload(model.state_dict(), arch), path)
    return path


def _embed_tile(tile, checkpoint, layout, tmp_path, **options):
    """The work window's embedding, assembled from the patches of a layout."""
    out_dir = tmp_path / "patches"
    written = infer_patches(tile / "stack.json", layout, roi_mask_path=tile / "roi.tif", checkpoint=checkpoint,
                            family=None, options=InferOptions(device="cpu", **options), out_dir=out_dir)
    result = np.full((WINDOW.height, WINDOW.width, 4), np.nan, np.float32)
    for patch, path in zip(layout, written):
        row, col = patch.row_off - WINDOW.row_off, patch.col_off - WINDOW.col_off
        result[row:row + patch.height, col:col + patch.width] = read_patch_embedding(path)
    return result


def test_random_draws_follow_tile_pixels_not_the_patch_layout(tmp_path, tile):
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.pt", "v1.0")  # v1.0-QAT draws with the same code
    whole = _embed_tile(tile, checkpoint, patches(WINDOW, 32), tmp_path / "a", seed=3)
    inside = ~np.isnan(whole[..., 0])
    assert inside.sum() > 60
    for layout in (patches(WINDOW, 10), [Window(104, 203, 13, 11)]):  # a grid of 10 px, and a crop
        other = _embed_tile(tile, checkpoint, layout, tmp_path / "b", seed=3)
        covered = ~np.isnan(other[..., 0])
        assert covered.any() and not (covered & ~inside).any()
        assert np.array_equal(other[covered], whole[covered])  # bit for bit
    reseeded = _embed_tile(tile, checkpoint, patches(WINDOW, 32), tmp_path / "c", seed=4)
    assert np.abs(reseeded[inside] - whole[inside]).max() > 1e-4
    averaged = _embed_tile(tile, checkpoint, patches(WINDOW, 32), tmp_path / "d", seed=3, repeat_times=3)
    assert np.isnan(averaged[~inside]).all() and np.abs(averaged[inside] - whole[inside]).max() > 1e-4


def test_tile_seed_depends_on_seed_and_tile():
    assert tile_seed(0, "grid_6.05_52.05") == tile_seed(0, "grid_6.05_52.05")
    assert len({tile_seed(0, "grid_6.05_52.05"), tile_seed(1, "grid_6.05_52.05"), tile_seed(0, "grid_6.15_52.05")}) == 3


def test_reference_patch_names():
    assert reference_patch_name(0, 3500, 5000, 5000, 500) == "0_3500_500_4000"  # UPSTREAM.md §3
    assert reference_patch_name(28, 14, 30, 20, 16) == "28_14_30_20"  # clipped to the grid


def test_export_patches_writes_the_reference_layout(tmp_path, tile):
    layout = patches(WINDOW, 16)  # 2 × 2 patches; the disc touches the top two only
    written = export_patches(tile / "stack.json", layout, tmp_path / "out", roi_mask_path=tile / "roi.tif",
                             patch_size=16)
    assert [p.name for p in written] == ["0_0_16_16", "16_0_30_16"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_0_16_16", "16_0_30_16"]  # no leftovers
    edge = written[1]
    assert sorted(p.name for p in edge.iterdir()) == sorted([
        "bands.npy", "masks.npy", "doys.npy", "sar_ascending.npy", "sar_ascending_doy.npy", "sar_descending.npy",
        "sar_descending_doy.npy", "roi.tiff"])
    expected = read_window(tile / "s2.zarr", tile / "s1.zarr", Window(16, 0, 16, 16))
    for name, array in expected.items():
        stored = np.load(edge / f"{name}.npy")
        assert stored.dtype == array.dtype and np.array_equal(stored, array), name
    assert np.load(edge / "bands.npy").shape == (STEPS, 16, 16, 10)
    assert not np.load(edge / "bands.npy")[:, :, 14:].any()  # beyond the window: zero padding
    with rasterio.open(edge / "roi.tiff") as src:
        assert (src.width, src.height, src.count, src.dtypes[0]) == (16, 16, 1, "uint8")
        assert src.crs == TILE.crs and src.nodata is None
        assert src.transform == WINDOW_TRANSFORM @ Affine.translation(16, 0)
        assert src.profile["compress"] == "lzw" and src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        mask = src.read(1)
    with rasterio.open(tile / "roi.tif") as src:
        tile_roi = src.read(1, window=Window(116, 200, 14, 16))
    assert set(np.unique(mask)) == {0, 1}
    assert np.array_equal(mask[:, :14], tile_roi) and not mask[:, 14:].any()
    # Without a list, every patch of the work window at that size.
    again = export_patches(tile / "stack.json", None, tmp_path / "all", roi_mask_path=tile / "roi.tif", patch_size=16)
    assert [p.name for p in again] == ["0_0_16_16", "16_0_30_16"]


def test_exported_patches_embed_like_the_stack(tmp_path, tile):
    """The reference-layout directory embeds to what the workflow computes for those pixels."""
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.pt", "v1.0-qat")
    [patch_dir] = export_patches(tile / "stack.json", [Window(100, 200, 16, 16)], tmp_path / "out",
                                 roi_mask_path=tile / "roi.tif", patch_size=16)
    via_directory = embed_reference_patch(patch_dir, checkpoint, None, tmp_path / "emb.npy", options=InferOptions(device="cpu", seed=3))
    with rasterio.open(patch_dir / "roi.tiff") as src:
        inside = src.read(1) > 0
    assert np.isnan(via_directory[~inside]).all()
    assert np.isfinite(via_directory[inside]).all()
    # Without roi.tiff every observed pixel is embedded (the reference reads no mask either).
    (patch_dir / "roi.tiff").unlink()
    everything = embed_reference_patch(patch_dir, checkpoint, None, tmp_path / "emb2.npy", options=InferOptions(device="cpu", seed=3))
    assert np.isfinite(everything).all()
    assert np.array_equal(everything[inside], via_directory[inside])


def test_export_refuses_windows_it_cannot_name(tmp_path, tile):
    with pytest.raises(UserError, match="larger than patch_size 8"):
        export_patches(tile / "stack.json", [Window(100, 200, 16, 16)], tmp_path / "out",
                       roi_mask_path=tile / "roi.tif", patch_size=8)
    with pytest.raises(UserError, match="reaches outside the work window"):
        export_patches(tile / "stack.json", [Window(96, 200, 8, 8)], tmp_path / "out",
                       roi_mask_path=tile / "roi.tif", patch_size=8)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_inference_refuses_a_stack_prepared_otherwise_than_its_family_was_trained_on(tmp_path, tile):
    """The tile's stack is prepared for v1.x (nearest); a v2 checkpoint expects bilinear."""
    import json

    from tessera.errors import UserError
    from tessera.models import make_demo_checkpoint

    assert json.loads((tile / "stack.json").read_text())["preprocessing"]["s2_resampling"] == "nearest"
    checkpoint = tmp_path / "v2.pt"
    make_demo_checkpoint(checkpoint, family="v2")
    layout = [Window(104, 203, 13, 11)]
    with pytest.raises(UserError, match=r"prepared otherwise than v2 checkpoints were trained on: "
                                        r"s2_resampling 'nearest' \(trained on 'bilinear'\).*allow_preprocessing_mismatch"):
        _embed_tile(tile, checkpoint, layout, tmp_path / "refused")
    assert not (tmp_path / "refused" / "patches").exists()
    options = InferOptions(device="cpu", allow_preprocessing_mismatch=True)
    written = infer_patches(tile / "stack.json", layout, roi_mask_path=tile / "roi.tif", checkpoint=checkpoint,
                            family=None, options=options, out_dir=tmp_path / "allowed")
    assert (~np.isnan(read_patch_embedding(written[0])[..., 0])).any()
