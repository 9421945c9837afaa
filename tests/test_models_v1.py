"""v1.0, v1.0-QAT and v1.1: reference vectors, strict loading of the published key layouts, and
each family's input preparation (time-step selection, order, normalisation, no-data, seeding)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.errors import UserError
from tessera.assemble import quantize
from tessera.infer import embed_reference_patch
from tessera.layout import read_reference_patch
from tessera.models.engine import Embedder, embed_arrays
from tessera.options import InferOptions
from tessera.models import get_family, load_model, make_demo_checkpoint
from tessera.models.sampling import counter_words, draw_steps, stream_key
from tessera.models.v1_0_qat import HandWrittenGRU, NormalisedGRUAttentionPooling
from tessera.models.v1_1 import build_resample_indices

from conftest import VECTORS, needs_shared
PATCH = VECTORS / "tile-level" / "tile" / "0_0_6_6"

# UPSTREAM.md §4.5 and §5.3, typed in again so that a wrong table in the code cannot pass.
V1_0_S2_MEAN = [1711.0938, 1308.8511, 1546.4543, 3010.1293, 3106.5083, 2068.3044, 2685.0845, 2931.5889,
                2514.6928, 1899.4922]
V1_0_S2_STD = [1926.1026, 1862.9751, 1803.1792, 1741.7837, 1677.4543, 1888.7862, 1736.3090, 1715.8104,
               1514.5199, 1398.4779]
V1_0_S1_MEAN, V1_0_S1_STD = [5484.0407, 3003.7812], [1871.2334, 1726.0670]
V1_1_AWS_S2_MEAN_B04, V1_1_AWS_S2_STD_B04 = 2793.6589, 2810.0093
V1_1_MPC_S2_MEAN_B04, V1_1_MPC_S2_STD_B04 = 2683.4553, 2739.5217


def _z(values, mean, std):
    return (np.float32(values) - np.float32(mean)) / (np.float32(std) + np.float32(1e-9))


def inputs(batch, sensor: str) -> torch.Tensor:
    """A batch's inputs for one sensor in the reference layout (rows, T, C + 1), raw DOY last."""
    return torch.cat([getattr(batch, f"{sensor}_bands"), getattr(batch, f"{sensor}_doys")[..., None]], -1)


def vector_model(name: str, family: str | None = None):
    """The small reference-vector model of a family; v1.0 checkpoints do not record their size."""
    meta = json.loads((VECTORS / name / "meta.json").read_text())
    arch = {} if name == "v1.1" else meta["config"]
    return load_model(VECTORS / name / "checkpoint.pt", family, **arch)


# ---------------------------------------------------------------------------------------------
# Models


@needs_shared
@pytest.mark.parametrize("name", ["v1.0", "v1.0-qat", "v1.1"])
def test_reproduces_reference_vectors(name):
    meta = json.loads((VECTORS / name / "meta.json").read_text())
    model = vector_model(name)
    assert model.family is get_family(name)  # detected from the keys alone
    vectors = np.load(VECTORS / name / "vectors.npz")
    with torch.inference_mode():
        out = model(torch.from_numpy(vectors["s2_x"]), torch.from_numpy(vectors["s1_x"])).numpy()
    assert out.shape == (16, meta["output_dim"])
    np.testing.assert_allclose(out, vectors["expected"], atol=1e-4, rtol=1e-4)


@needs_shared
def test_v1_1_architecture_comes_from_the_checkpoint_config():
    config = json.loads((VECTORS / "v1.1" / "meta.json").read_text())["config"]
    model = vector_model("v1.1", "v1.1")
    for key in ("latent_dim", "representation_dim", "save_embedding_dim", "s2_num_heads", "s1_num_layers"):
        assert model.arch[key] == config[key]
    family = model.family
    assert family.embedding_dim(model.arch) == 16
    output = torch.arange(48.0).view(2, 24)
    assert torch.equal(family.stored_embedding(output, model.arch), output[:, :16])


@needs_shared
@pytest.mark.parametrize("config, message", [
    ({"split_s1_modalities": True}, "split_s1_modalities"),
    ({"num_obs_checkpoints": [16, 32]}, "num_obs_checkpoints"),
    ({"fusion_method": "attention"}, "fusion_method"),
])
def test_v1_1_unsupported_configs_are_refused(tmp_path, config, message):
    payload = torch.load(VECTORS / "v1.1" / "checkpoint.pt", weights_only=True)
    payload["config"] = {**payload["config"], **config}
    torch.save(payload, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "odd.pt")


def test_qat_pooling_special_cases():
    pooling = NormalisedGRUAttentionPooling(8).eval()
    tokens = torch.randn(3, 1, 8)
    assert torch.equal(pooling(tokens), tokens[:, 0])
    assert torch.equal(pooling(torch.zeros(3, 0, 8)), torch.zeros(3, 8))


def test_hand_written_gru_follows_the_reference_cell():
    """The fused loop against the cell equations of UPSTREAM.md §4.8, one step at a time."""
    torch.manual_seed(0)
    gru = HandWrittenGRU(6)
    for parameter in gru.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(3, 5, 6)
    c = gru.gru_cell
    h, expected = torch.zeros(3, 6), []
    for step in range(5):
        xt = x[:, step]
        r = torch.sigmoid(xt @ c.W_ir.weight.T + h @ c.W_hr.weight.T + c.b_r)
        z = torch.sigmoid(xt @ c.W_iz.weight.T + h @ c.W_hz.weight.T + c.b_z)
        candidate = torch.tanh(xt @ c.W_ih.weight.T + (r * h) @ c.W_hh.weight.T + c.b_h)
        h = (1 - z) * h + z * candidate
        expected.append(h)
    with torch.inference_mode():
        torch.testing.assert_close(gru(x), torch.stack(expected, dim=1), atol=1e-6, rtol=1e-5)


# UPSTREAM.md §4.2, §4.8, §5.2: encoder parameters of the published models.
ENCODER_PARAMETERS = {"v1.0": 87_841_922, "v1.0-qat": 45_828_226, "v1.1": 57_708_738}


def _published_checkpoint(path: Path, family: str, *, random: bool, drop: str | None = None,
                          add: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint with every key of keys/<family>.json in the published top-level layout.

    ``random``: normal tensors (else one repeated zero). The training projector (1.3 B numbers in
    v1.0 / QAT) is always a zero-stride view, which torch saves as a single number.
    """
    listing = json.loads((VECTORS / "keys" / f"{family}.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in listing["keys"].items():
        if random and not key.startswith("projector."):
            state[key] = torch.randn(shape, generator=generator) * 0.02
        else:
            state[key] = torch.zeros(()).expand(shape)
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    compiled = {f"_orig_mod.{key}": value for key, value in state.items()}
    if family == "v1.1":
        payload = {"model_state_dict": compiled, "config": listing["config"]}
    elif family == "v1.0":
        payload = {"epoch": 7, "model_state": compiled}  # the loader's first choice of key
    else:
        payload = {"epoch": 7, "model_state_dict": compiled}
    torch.save(payload, path)
    return state


@needs_shared
@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat", "v1.1"])
def test_published_key_layout_loads_strictly(tmp_path, family):
    state = _published_checkpoint(tmp_path / "ckpt.pt", family, random=True)
    model = load_model(tmp_path / "ckpt.pt")
    assert model.family is get_family(family)
    encoder_keys = {k for k in state if not k.startswith("projector.")}
    assert set(model.state_dict()) == encoder_keys
    assert sum(p.numel() for p in model.parameters()) == ENCODER_PARAMETERS[family]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in encoder_keys)
    assert model.family.embedding_dim(model.arch) == 128


@needs_shared
@pytest.mark.parametrize("family, key", [
    ("v1.0", "s1_backbone.attn_pool.temporal_context.bias_hh_l0"),
    ("v1.0-qat", "s2_backbone.attn_pool.temporal_context.gru_cell.W_hz.weight"),
    ("v1.1", "dim_reducer.1.bias"),
])
def test_missing_or_extra_key_is_refused_by_name(tmp_path, family, key):
    _published_checkpoint(tmp_path / "missing.pt", family, random=False, drop=key)
    with pytest.raises(UserError, match=f"missing {re.escape(key)}"):
        load_model(tmp_path / "missing.pt", family)
    _published_checkpoint(tmp_path / "extra.pt", family, random=False, add="s2_backbone.attn_pool.extra.bias")
    with pytest.raises(UserError, match=r"unexpected s2_backbone\.attn_pool\.extra\.bias"):
        load_model(tmp_path / "extra.pt", family)


@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat", "v1.1"])
def test_demo_checkpoint_round_trips(tmp_path, family):
    make_demo_checkpoint(tmp_path / "demo.pt", family, seed=1)
    model = load_model(tmp_path / "demo.pt")
    assert model.family is get_family(family)
    assert model.arch["latent_dim"] == 64


def test_v1_quantisation_floors_the_scale():
    codes, scales = quantize(np.array([[0.0, 0.0], [-127.0, 62.5]], np.float32), "v1.0")
    assert scales[0] == np.float32(1e-8) and not codes[0].any()  # v2 would floor max|e| instead
    assert scales[1] == 1.0 and codes[1].tolist() == [-127, 62]  # half to even


# ---------------------------------------------------------------------------------------------
# v1.0 / v1.0-QAT time-step selection


def _draw(valid: np.ndarray, seed: int = 0) -> np.ndarray:
    pixels = np.arange(len(valid))
    return draw_steps(valid, valid.sum(axis=1), counter_words(stream_key(seed, 0), pixels, np.arange(valid.shape[1])),
                      lambda rows: counter_words(stream_key(seed, 1), pixels[rows], np.arange(40)), 40)


def test_draws_follow_the_replacement_rule():
    valid = np.zeros((4, 60), bool)
    valid[0] = True  # 60 valid: 40 distinct
    valid[1, 10:50] = True  # exactly 40 valid: all of them
    valid[2, [3, 30, 59]] = True  # 3 valid: with replacement
    # valid[3]: none valid → drawn from all 60 steps
    steps = _draw(valid)
    assert (np.diff(steps, axis=1) >= 0).all()
    assert len(set(steps[0])) == 40
    assert steps[1].tolist() == list(range(10, 50))
    assert set(steps[2]) <= {3, 30, 59} and len(set(steps[2])) == 3
    assert len(set(steps[3])) == 40
    short = np.zeros((2, 25), bool)  # fewer steps than 40 at all
    short[0, [2, 7]] = True
    steps = _draw(short)
    assert steps.shape == (2, 40) and set(steps[0]) == {2, 7} and set(steps[1]) <= set(range(25))


def test_draws_are_uniform():
    few = np.zeros((4000, 60), bool)
    few[:, [5, 6, 20, 41, 59]] = True
    counts = np.bincount(_draw(few).ravel(), minlength=60)
    assert counts[[5, 6, 20, 41, 59]].sum() == 4000 * 40
    np.testing.assert_allclose(counts[[5, 6, 20, 41, 59]] / (4000 * 40), 0.2, atol=0.01)
    many = np.ones((4000, 60), bool)
    np.testing.assert_allclose(np.bincount(_draw(many).ravel(), minlength=60) / 4000, 40 / 60, atol=0.03)


def _synthetic_patch(*, asc_steps: int = 6, desc_steps: int = 5) -> dict[str, np.ndarray]:
    """2 × 3 pixels. S2 band values encode (step, band); S1 values encode (orbit step, channel).

    Pixel 0: every S2 step valid, S1 valid. 1: three S2 steps valid. 2: no S2 valid, S1 valid.
    3: nothing valid in either sensor. 4: S2 valid, no S1 valid. 5: as 0.
    """
    steps, height, width = 50, 2, 3
    bands = np.empty((steps, height, width, 10), np.uint16)
    bands[:] = (1000 + 10 * np.arange(steps)[:, None, None, None] + np.arange(10)).astype(np.uint16)
    masks = np.ones((steps, height, width), np.uint8)
    masks[:, 0, 1] = 0
    masks[[4, 17, 33], 0, 1] = 1
    masks[:, 0, 2] = 0
    masks[:, 1, 0] = 0
    sar = {}
    for orbit, count, doy0, code0 in (("ascending", asc_steps, 200, 6000), ("descending", desc_steps, 10, 3000)):
        values = np.empty((count, height, width, 2), np.int16)
        values[:] = (code0 + 10 * np.arange(count)[:, None, None, None] + np.arange(2)).astype(np.int16)
        values[:, 1, 0] = 0
        values[:, 1, 1] = 0
        sar[f"sar_{orbit}"] = values
        sar[f"sar_{orbit}_doy"] = (doy0 + 7 * np.arange(count)).astype(np.int16)
    return {"bands": bands, "masks": masks, "doys": (3 + 7 * np.arange(steps)).astype(np.uint16), **sar}


def _batch(family: str, arrays, **options):
    batches = list(get_family(family).prepare_batches(arrays, np.arange(6), data_kind="mpc", seed=5,
                                                      batch_pixels=64, **options))
    assert len(batches) == 1
    return batches[0]


@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat"])
def test_v1_0_inputs_are_standardised_sorted_and_skip_empty_pixels(family):
    arrays = _synthetic_patch()
    batch = _batch(family, arrays)
    # The reference embeds every pixel with a non-zero S2 value, pixel 3 too (no valid step: drawn
    # from all of them; no S1: zero codes).
    assert batch.pixels.tolist() == [0, 1, 2, 3, 4, 5]
    s2, s1 = inputs(batch, "s2").numpy(), inputs(batch, "s1").numpy()
    assert len(set(((s2[3, :, 10] - 3) / 7).tolist())) == 40
    s2, s1 = np.delete(s2, 3, axis=0), np.delete(s1, 3, axis=0)
    assert s2.shape == (5, 40, 11) and s1.shape == (5, 40, 3)
    # S2: chronological, the bands of the drawn step standardised with the v1.0 table, raw DOY last.
    step = (s2[..., 10] - 3) / 7
    assert (np.diff(step, axis=1) >= 0).all()
    expected = 1000 + 10 * step[..., None] + np.arange(10)
    np.testing.assert_allclose(s2[..., :10], _z(expected, V1_0_S2_MEAN, V1_0_S2_STD), rtol=1e-5, atol=1e-5)
    assert set(step[1]) <= {4, 17, 33}
    assert len(set(step[2])) == 40  # no valid S2: drawn from all 50 steps, without replacement
    # S1: the ascending block (DOY ≥ 200), then the descending block, each chronological; pooled stats.
    doy = s1[..., 2]
    for row in doy:
        ascending = row >= 200
        assert not (ascending[1:] & ~ascending[:-1]).any()  # no ascending step after a descending one
        assert (np.diff(row[ascending]) >= 0).all() and (np.diff(row[~ascending]) >= 0).all()
    code = np.where(doy >= 200, 6000 + 10 * (doy - 200) / 7, 3000 + 10 * (doy - 10) / 7)
    valid_s1 = [0, 1, 2, 4]
    np.testing.assert_allclose(s1[valid_s1, :, 0], _z(code[valid_s1], V1_0_S1_MEAN[0], V1_0_S1_STD[0]),
                               rtol=1e-5, atol=1e-5)
    # Pixel 4 (no valid S1) is fed zero codes, standardised, as the reference does.
    np.testing.assert_allclose(s1[3, :, :2], np.broadcast_to(_z([0, 0], V1_0_S1_MEAN, V1_0_S1_STD), (40, 2)),
                               rtol=1e-6)


@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat"])
def test_v1_0_embeds_the_pixels_the_reference_embeds(family):
    """SingleTileInferenceDataset keeps a pixel iff some S2 band value is non-zero: S1 alone is not enough."""
    arrays = _synthetic_patch()
    arrays["bands"][:, 0, 2] = 0  # pixel 2: no S2 value at all, valid S1
    arrays["masks"][:, 0, 2] = 0
    arrays["bands"][7, 1, 1, 9] = 3  # pixel 4: one non-zero band value (B12 at step 7), masked, and no S1
    arrays["bands"][:, 1, 1, :9] = 0
    arrays["bands"][:7, 1, 1] = 0
    arrays["bands"][8:, 1, 1] = 0
    arrays["masks"][:, 1, 1] = 0
    assert _batch(family, arrays).pixels.tolist() == [0, 1, 3, 4, 5]


def test_qat_gives_an_empty_orbit_a_zero_step_at_doy_180():
    arrays = _synthetic_patch(asc_steps=0)
    qat = inputs(_batch("v1.0-qat", arrays), "s1").numpy()
    plain = inputs(_batch("v1.0", arrays), "s1").numpy()
    # Pixel 4 has no valid S1: the QAT series is [placeholder, 5 descending steps], v1.0's the 5 alone.
    assert 180 in qat[3, :, 2] and 180 not in plain[3, :, 2]
    assert 180 not in qat[0, :, 2]  # the placeholder is not a valid step
    both_empty = _synthetic_patch(asc_steps=0, desc_steps=0)
    for family in ("v1.0", "v1.0-qat"):  # the v1.0 reference fails here; both use the placeholder
        s1 = inputs(_batch(family, both_empty), "s1").numpy()
        assert (s1[..., 2] == 180).all()


@needs_shared
def test_repeat_times_averages_independent_draws():
    arrays = _synthetic_patch()
    single = _batch("v1.0", arrays)
    repeated = _batch("v1.0", arrays, repeat_times=3)
    assert repeated.repeats == 3 and repeated.s2_bands.shape == (18, 40, 10) and repeated.s1_doys.shape == (18, 40)
    # Each pixel's three draws are adjacent rows; the first is the single draw.
    assert torch.equal(inputs(repeated, "s2")[::3], inputs(single, "s2"))
    assert torch.equal(inputs(repeated, "s1")[::3], inputs(single, "s1"))
    assert not torch.equal(repeated.s2_doys[1::3], repeated.s2_doys[::3])
    model = vector_model("v1.0")
    averaged = Embedder(model, InferOptions(device="cpu")).embed_batch(repeated)
    with torch.inference_mode():
        draws = model(inputs(repeated, "s2"), inputs(repeated, "s1")).view(6, 3, -1)
    np.testing.assert_allclose(averaged, draws.mean(dim=1).numpy(), atol=1e-6, rtol=1e-6)
    assert np.abs(draws[:, 0].numpy() - averaged).max() > 1e-4  # the draws differ: averaging does something
    with pytest.raises(UserError, match="repeat_times"):
        _batch("v1.0", arrays, repeat_times=0)


@needs_shared
@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat"])
def test_seeded_embeddings_are_identical_across_runs_batch_sizes_and_rois(family):
    arrays = read_reference_patch(PATCH)
    model = vector_model(family)
    first = embed_arrays(model, arrays, seed=11, device="cpu", batch_pixels=4096)
    no_data = np.isnan(first[..., 0])
    # Pixel (0, 0) has S2 values, all masked, and no S1: the reference's v1.0 rule embeds it (drawing
    # from every S2 step); the bucketed families leave it out.
    assert not no_data.any()
    assert np.array_equal(first, embed_arrays(model, arrays, seed=11, device="cpu"), equal_nan=True)
    for batch_pixels in (1, 5, 13):
        again = embed_arrays(model, arrays, seed=11, device="cpu", batch_pixels=batch_pixels)
        assert np.array_equal(first, again, equal_nan=True), batch_pixels
    # A pixel's draws depend on (seed, pixel) only, not on which other pixels are embedded.
    roi = np.zeros((6, 6), bool)
    roi[2:5, 1:4] = True
    part = embed_arrays(model, arrays, valid=roi, seed=11, device="cpu")
    assert np.array_equal(part[roi], first[roi]) and np.isnan(part[~roi]).all()
    other_seed = embed_arrays(model, arrays, seed=12, device="cpu")
    assert np.nanmax(np.abs(other_seed - first)) > 1e-3


@needs_shared
@pytest.mark.parametrize("family", ["v1.0", "v1.0-qat"])
def test_a_date_invalid_at_a_pixel_does_not_change_its_draws(family):
    """Overlapping runs can have different time axes (a date without any valid pixel in one work
    window is not stored): a pixel's draws depend only on its own candidate dates."""
    arrays = _synthetic_patch()
    arrays["masks"][7, 0, 0] = 0  # pixel 0: 49 of 50 steps valid, drawn without replacement
    model = vector_model(family)
    first = embed_arrays(model, arrays, seed=11, origin=(40, 70), device="cpu")
    dropped = {**arrays, "bands": np.delete(arrays["bands"], 7, 0), "masks": np.delete(arrays["masks"], 7, 0),
               "doys": np.delete(arrays["doys"], 7)}
    second = embed_arrays(model, dropped, seed=11, origin=(40, 70), device="cpu")
    assert np.array_equal(second[0, 0], first[0, 0])
    assert np.array_equal(second[0, 1], first[0, 1])  # three valid steps, drawn with replacement
    assert np.abs(second[1, 2] - first[1, 2]).max() > 1e-4  # step 7 was a candidate there


# ---------------------------------------------------------------------------------------------
# v1.1 bucketed all-observation input


def test_build_resample_indices():
    assert build_resample_indices(5, 8).tolist() == [0, 1, 2, 3, 4, 1, 2, 3]  # UPSTREAM.md §5.4
    assert build_resample_indices(3, 8).tolist() == [0, 1, 2, 0, 1, 1, 1, 2]  # rint(0.5) = 0, rint(1.5) = 2
    assert build_resample_indices(1, 8).tolist() == [0] * 8
    assert build_resample_indices(16, 16).tolist() == list(range(16))
    for n, length in [(10, 8), (17, 16), (255, 8), (300, 256), (9, 8)]:
        middles = [chunk[len(chunk) // 2] for chunk in np.array_split(np.arange(n), length)]
        assert build_resample_indices(n, length).tolist() == middles


def test_v1_1_bins():
    family = get_family("v1.1")
    counts = np.array([0, 1, 8, 9, 16, 17, 255, 256, 257, 1000])
    assert family.bins(counts).tolist() == [8, 8, 8, 16, 16, 24, 256, 256, 256, 256]


@needs_shared
def test_v1_1_reproduces_the_tile_level_reference(tmp_path):
    expected = np.load(VECTORS / "tile-level" / "expected.npz")["v1_1"]
    stored = embed_reference_patch(PATCH, VECTORS / "v1.1" / "checkpoint.pt", "v1.1", tmp_path / "out.npy",
                                   data_kind="mpc", options=InferOptions(device="cpu"))
    assert stored.shape == (6, 6, 16)
    assert np.array_equal(np.isnan(stored), np.isnan(expected[..., :16]))
    np.testing.assert_allclose(stored, expected[..., :16], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), stored)
    # The full representation as well, through the family's own batches.
    model = vector_model("v1.1")
    full = np.full((36, 24), np.nan, np.float32)
    batches = model.family.prepare_batches(read_reference_patch(PATCH), np.arange(36), data_kind="mpc",
                                           seed=0, batch_pixels=7)
    with torch.inference_mode():
        for batch in batches:
            full[batch.pixels] = model(inputs(batch, "s2"), inputs(batch, "s1")).numpy()
    np.testing.assert_allclose(full.reshape(6, 6, 24), expected, atol=1e-4, rtol=1e-4)


def _v1_1_checkpoint_trained_on(tmp_path: Path, source: str, *, in_config: bool) -> Path:
    """The reference v1.1 checkpoint, saying it was trained on ``source`` data in its config or
    (as published) in its file name."""
    checkpoint = torch.load(VECTORS / "v1.1" / "checkpoint.pt", map_location="cpu", weights_only=False)
    if in_config:
        checkpoint["config"] = {**checkpoint.get("config", {}), "data_source": source}
        path = tmp_path / "checkpoint.pt"
    else:
        path = tmp_path / f"tessera_v1_1_{source}_encoder.pt"
    torch.save(checkpoint, path)
    return path


@needs_shared
@pytest.mark.parametrize("in_config", [True, False], ids=["config", "file name"])
def test_v1_1_refuses_data_of_the_other_source_unless_allowed(tmp_path, in_config, capsys):
    from tessera.cli import main

    checkpoint = _v1_1_checkpoint_trained_on(tmp_path, "aws", in_config=in_config)
    embed = ["-q", "embed-patch", str(PATCH), "--checkpoint", str(checkpoint), "--family", "v1.1", "--device", "cpu"]
    assert main([*embed, "--data-source", "mpc", "--out", str(tmp_path / "mpc.npy")]) == 2
    error = capsys.readouterr().err
    assert "mpc-kind data" in error and "trained on aws data" in error and "--allow-source-mismatch" in error
    assert not (tmp_path / "mpc.npy").exists()

    assert main([*embed, "--data-source", "mpc", "--allow-source-mismatch", "--out", str(tmp_path / "mpc.npy")]) == 0
    assert main([*embed, "--out", str(tmp_path / "default.npy")]) == 0  # the checkpoint's own source
    assert main([*embed, "--data-source", "aws", "--out", str(tmp_path / "aws.npy")]) == 0
    mpc, default, aws = (np.load(tmp_path / f"{name}.npy") for name in ("mpc", "default", "aws"))
    np.testing.assert_array_equal(default, aws)
    assert not np.allclose(mpc, aws, equal_nan=True)  # the tables differ, so do the embeddings


@needs_shared
def test_embed_patch_takes_the_seed_and_repeat_times_of_v1_0_draws(tmp_path):
    from tessera.cli import main

    checkpoint = tmp_path / "v1.0.pt"
    make_demo_checkpoint(checkpoint, family="v1.0")

    def embed(name: str, *options: str) -> np.ndarray:
        args = ["-q", "embed-patch", str(PATCH), "--checkpoint", str(checkpoint), "--device", "cpu", "--precision",
                "fp32", *options, "--out", str(tmp_path / f"{name}.npy")]
        assert main(args) == 0
        return np.load(tmp_path / f"{name}.npy")

    first, again, other_seed = embed("a", "--seed", "1"), embed("b", "--seed", "1"), embed("c", "--seed", "2")
    averaged = embed("d", "--seed", "1", "--repeat-times", "3")
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other_seed, equal_nan=True)
    assert not np.allclose(first, averaged, equal_nan=True)


def test_v1_1_no_valid_sensor_gets_eight_zero_rows():
    arrays = _synthetic_patch()
    batches = list(get_family("v1.1").prepare_batches(arrays, np.arange(6), data_kind="mpc", seed=0,
                                                      batch_pixels=64))
    by_pixel = {int(p): (inputs(b, "s2")[i], inputs(b, "s1")[i]) for b in batches for i, p in enumerate(b.pixels)}
    assert sorted(by_pixel) == [0, 1, 2, 4, 5]
    assert by_pixel[2][0].shape == (8, 11) and not by_pixel[2][0].any()  # no valid S2
    assert by_pixel[4][1].shape == (8, 3) and not by_pixel[4][1].any()  # no valid S1
    assert by_pixel[0][0].shape == (56, 11)  # 50 valid S2 steps → bin 56
    assert by_pixel[1][0][:, 10].tolist() == [31, 122, 234, 31, 122, 122, 122, 234]  # 3 valid → 8


@pytest.mark.parametrize("source, mean, std", [("mpc", V1_1_MPC_S2_MEAN_B04, V1_1_MPC_S2_STD_B04),
                                               ("aws", V1_1_AWS_S2_MEAN_B04, V1_1_AWS_S2_STD_B04)])
def test_v1_1_normalisation_follows_the_data_source(source, mean, std):
    arrays = _synthetic_patch()
    batch = next(get_family("v1.1").prepare_batches(arrays, np.array([0]), data_kind=source, seed=0,
                                                    batch_pixels=8))
    np.testing.assert_allclose(batch.s2_bands[0, :, 0].numpy(), _z(1000 + 10 * np.arange(50), mean, std)[
        build_resample_indices(50, 56)], rtol=1e-6)


def test_v1_1_unknown_data_source_is_refused():
    with pytest.raises(UserError, match="data kind 'stac' has no v1.1 normalisation table"):
        next(get_family("v1.1").prepare_batches(_synthetic_patch(), np.arange(6), data_kind="stac", seed=0,
                                                batch_pixels=8))
