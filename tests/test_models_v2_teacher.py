"""v2 2B teacher: reference vectors and input preparation, the tile end to end (API and CLI), strict
loading of the full-size published layout, family detection, demo checkpoints."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.cli import main
from tessera.errors import UserError
from tessera.assemble import quantize
from tessera.layout import read_reference_patch
from tessera.models.engine import embed_arrays
from tessera.models import family_entry, get_family, load_model, make_demo_checkpoint
from tessera.models.checkpoint import load_state_dict_strictly, matching_families

from conftest import VECTORS, needs_shared

TEACHER = get_family("v2-teacher")
CHECKPOINT = VECTORS / "v2-teacher" / "checkpoint.pt"
TILE = VECTORS / "tile-level" / "tile" / "0_0_6_6"
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def _vectors():
    return np.load(VECTORS / "v2-teacher" / "vectors.npz")


def _pixels_as_patch(vectors) -> dict[str, np.ndarray]:
    """The 16 ``pixels_*`` series (shared DOYs) as a 4×4 patch in the reference per-patch layout."""

    def patch(series: np.ndarray) -> np.ndarray:  # (16, T, ...) → (T, 4, 4, ...)
        return np.ascontiguousarray(np.moveaxis(series, 0, 1).reshape(series.shape[1], 4, 4, *series.shape[2:]))

    return {
        "bands": patch(vectors["pixels_s2_bands"]), "masks": patch(vectors["pixels_s2_masks"]),
        "doys": vectors["pixels_s2_doys"],
        "sar_ascending": patch(vectors["pixels_s1_asc_bands"]), "sar_ascending_doy": vectors["pixels_s1_asc_doys"],
        "sar_descending": patch(vectors["pixels_s1_desc_bands"]),
        "sar_descending_doy": vectors["pixels_s1_desc_doys"],
    }


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    """Rows in lexicographic order: the model is permutation-invariant over time steps."""
    return rows[np.lexsort(rows.T[::-1])]


@needs_shared
def test_reproduces_reference_vectors():
    meta = json.loads((VECTORS / "v2-teacher" / "meta.json").read_text())
    model = load_model(CHECKPOINT)
    assert model.family is TEACHER
    assert model.arch == meta["config"]
    vectors = _vectors()
    with torch.inference_mode():
        out = model(torch.from_numpy(vectors["s2_x"]), torch.from_numpy(vectors["s1_x"])).numpy()
    assert out.shape == (16, meta["output_dim"])
    np.testing.assert_allclose(out, vectors["expected"], **TOLERANCE)


@needs_shared
def test_fusion_transformer_is_fixed_whatever_the_arch():
    model = load_model(CHECKPOINT)  # nhead 2, feed-forward 64, latent 8 (D 32)
    backbone_layer = model.s2_backbone.transformer_encoder.layers[0]
    fusion_layers = model.fusion_transformer.layers
    assert backbone_layer.nhead == 2 and backbone_layer.linear1.out_features == 64
    assert len(fusion_layers) == 2
    assert all(layer.nhead == 4 and layer.linear1.out_features == 2 * 32 for layer in fusion_layers)


@needs_shared
def test_prepares_the_reference_inputs_from_raw_series():
    vectors = _vectors()
    batches = list(TEACHER.prepare_batches(_pixels_as_patch(vectors), np.arange(16), data_kind="mpc", seed=0,
                                           batch_pixels=3))
    prepared = {}
    for batch in batches:
        for row, pixel in enumerate(batch.pixels):
            prepared[int(pixel)] = {sensor: torch.cat([getattr(batch, f"{sensor}_bands")[row],
                                                       getattr(batch, f"{sensor}_doys")[row, :, None]], -1).numpy()
                                    for sensor in ("s2", "s1")}
    lengths = {"s2": vectors["pixels_s2_len"], "s1": vectors["pixels_s1_len"]}
    not_computed = {p for p in range(16) if lengths["s2"][p] == 0 and lengths["s1"][p] == 0}
    assert not_computed == {0} and set(prepared) == set(range(16)) - not_computed
    for pixel, inputs in prepared.items():
        for sensor, rows in inputs.items():
            expected = vectors[f"pixels_{sensor}_x"][pixel, :lengths[sensor][pixel]]
            assert rows.shape == expected.shape, (pixel, sensor)
            np.testing.assert_allclose(_sorted_rows(rows), _sorted_rows(expected), atol=1e-5, rtol=1e-6)


@needs_shared
def test_raw_series_end_to_end_with_no_data_as_nan():
    vectors = _vectors()
    model = load_model(CHECKPOINT, "v2-teacher")
    got = embed_arrays(model, _pixels_as_patch(vectors), device="cpu", batch_pixels=5).reshape(16, -1)
    expected = vectors["pixels_expected"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(got[0]).all()  # the pixel without any observation (the reference writes zeros)
    np.testing.assert_allclose(got, expected, equal_nan=True, **TOLERANCE)


@needs_shared
@pytest.mark.parametrize("family", [["--family", "v2-teacher"], []], ids=["named", "detected"])
def test_reference_tile_through_embed_patch(tmp_path, family):
    out = tmp_path / "embedding.npy"
    assert main(["-q", "embed-patch", str(TILE), "--checkpoint", str(CHECKPOINT), *family, "--device", "cpu",
                 "--out", str(out)]) == 0
    got = np.load(out)
    expected = np.load(VECTORS / "tile-level" / "expected_teacher.npz")["v2_teacher"]
    assert got.dtype == np.float32 and got.shape == expected.shape == (6, 6, 32)  # the full vector, not truncated
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(expected).any()
    np.testing.assert_allclose(got, expected, equal_nan=True, **TOLERANCE)


@needs_shared
def test_student_checkpoint_is_not_a_teacher(tmp_path, capsys):
    out = tmp_path / "embedding.npy"
    student = VECTORS / "v2-student" / "checkpoint.pt"
    assert main(["-q", "embed-patch", str(TILE), "--checkpoint", str(student), "--family", "v2-teacher",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "looks like family v2, not v2-teacher" in capsys.readouterr().err
    assert not out.exists()


@needs_shared
def test_teacher_weights_under_the_students_key_are_not_taken_for_a_student():
    state = torch.load(CHECKPOINT, weights_only=True)["encoder_state_dict"]
    assert matching_families({"model": state, "args": {}}) == []
    assert matching_families({"encoder_state_dict": state}) == [TEACHER]


def _published_listing() -> dict:
    return json.loads((VECTORS / "keys" / "v2-teacher.json").read_text())


def _published_checkpoint(path: Path, *, drop: str | None = None) -> Path:
    """The full-size teacher's keys and shapes in its published layout, as meta tensors: a few kB on
    disk instead of 8 GB, and they load (on the meta device) through the same code."""
    listing = _published_listing()
    state = {key: torch.empty(shape, device="meta") for key, shape in listing["keys"].items() if key != drop}
    torch.save({"encoder_state_dict": state, "arch": dict(listing["config"])}, path)
    return path


@needs_shared
def test_full_size_published_layout_loads_strictly(tmp_path):
    listing = _published_listing()
    model = load_model(_published_checkpoint(tmp_path / "teacher.pt"))
    assert model.family is TEACHER
    assert model.arch == listing["config"] == TEACHER.default_arch()
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == listing["keys"]
    assert sum(p.numel() for p in model.parameters()) == listing["parameters"] == 2_064_266_242
    assert TEACHER.embedding_dim(model.arch) == 1024


@needs_shared
def test_full_size_arch_defaults_when_the_checkpoint_records_none():
    listing = _published_listing()
    assert TEACHER.arch_from_checkpoint({"encoder_state_dict": {}}) == {}
    with torch.device("meta"):
        model = TEACHER.build(**TEACHER.default_arch())
    state = {key: torch.empty(shape, device="meta") for key, shape in listing["keys"].items()}
    load_state_dict_strictly(model, state, "teacher.pt")
    assert sum(p.numel() for p in model.parameters()) == listing["parameters"]


@needs_shared
def test_missing_fusion_key_is_refused_by_name(tmp_path):
    path = _published_checkpoint(tmp_path / "teacher.pt", drop="fusion_transformer.layers.1.k_norm.weight")
    with pytest.raises(UserError, match=r"missing fusion_transformer\.layers\.1\.k_norm\.weight"):
        load_model(path, "v2-teacher")


def test_quantisation_and_output_are_the_v2_kind_without_truncation():
    assert TEACHER.quantisation == get_family("v2").quantisation
    assert not TEACHER.matryoshka
    embedding = np.linspace(-3, 3, 1024, dtype=np.float32)[None]
    assert TEACHER.stored_embedding(torch.from_numpy(embedding), TEACHER.default_arch()).shape == (1, 1024)
    codes, scales = quantize(embedding, "v2-teacher")
    assert codes.shape == (1, 1024) and codes.max() == 127 and codes.min() == -127
    np.testing.assert_allclose(codes * scales[:, None], embedding, atol=float(scales[0]) / 2 + 1e-7)


def test_family_figures_for_planning_and_export():
    entry = family_entry("v2-teacher")
    assert entry.dataset_version == "2.0" and entry.macs_per_pixel == 106e9  # UPSTREAM.md §9, 64 + 64 steps


def test_demo_checkpoint_is_deterministic_published_and_labelled(tmp_path):
    first, second, other = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    make_demo_checkpoint(first, "v2-teacher", seed=3)
    make_demo_checkpoint(second, "v2-teacher", seed=3)
    make_demo_checkpoint(other, "v2-teacher", seed=4)
    first_digest, second_digest, other_digest = (hashlib.sha256(p.read_bytes()).hexdigest()
                                                 for p in (first, second, other))
    assert first_digest == second_digest != other_digest
    raw = torch.load(first, weights_only=True)
    assert {"encoder_state_dict", "arch"} <= set(raw)
    assert "meaningless" in raw["tessera_demo"]
    assert raw["arch"]["repr_dim"] == 1024 and raw["arch"]["latent_dim"] == 8
    assert first.stat().st_size < 2_000_000


def test_demo_checkpoint_embeds_a_tiny_patch(tmp_path):
    make_demo_checkpoint(tmp_path / "demo.pt", "v2-teacher")
    model = load_model(tmp_path / "demo.pt")
    assert model.family is TEACHER
    rng = np.random.default_rng(0)
    steps, sar_steps, height, width = 7, 4, 3, 5
    masks = rng.integers(0, 2, (steps, height, width), dtype=np.uint8)
    masks[:, 0, 0] = 0  # pixel (0, 0): no observation in either sensor
    ascending = rng.integers(1, 9000, (sar_steps, height, width, 2)).astype(np.int16)
    ascending[:, 0, 0] = 0
    arrays = {
        "bands": rng.integers(0, 10000, (steps, height, width, 10)).astype(np.uint16), "masks": masks,
        "doys": np.arange(10, 10 + 30 * steps, 30, dtype=np.uint16),
        "sar_ascending": ascending, "sar_ascending_doy": np.arange(5, 5 + 40 * sar_steps, 40, dtype=np.int16),
        "sar_descending": np.zeros((0, height, width, 2), np.int16), "sar_descending_doy": np.zeros(0, np.int16),
    }
    embedding = embed_arrays(model, arrays, device="cpu")
    assert embedding.shape == (height, width, 1024)
    assert np.isnan(embedding[0, 0]).all()
    observed = embedding.reshape(-1, 1024)[1:]
    assert np.isfinite(observed).all()
    np.testing.assert_allclose(observed.mean(-1), 0, atol=1e-4)  # the final non-affine LayerNorm
    np.testing.assert_allclose(observed.std(-1), 1, atol=1e-2)


@needs_shared
def test_qk_norm_runs_in_float32_under_bf16_autocast():
    model = load_model(CHECKPOINT)
    vectors = _vectors()
    seen = {}
    layer = model.s2_backbone.transformer_encoder.layers[0]

    def record(module, inputs, output):  # returns None: the output stays as it is
        seen[module] = (inputs[0].dtype, output.dtype)

    for module in (layer.q_proj, layer.q_norm, layer.k_norm):
        module.register_forward_hook(record)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.from_numpy(vectors["s2_x"]), torch.from_numpy(vectors["s1_x"]))
    assert seen[layer.q_proj][1] == torch.bfloat16  # the projections run in bf16 ...
    assert seen[layer.q_norm] == seen[layer.k_norm] == (torch.float32, torch.float32)  # ... their norms in fp32
    cosine = torch.nn.functional.cosine_similarity(out.float(), torch.from_numpy(vectors["expected"]), dim=-1)
    assert cosine.min() > 0.999


@needs_shared
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_stay_close_to_fp32(precision):
    model = load_model(CHECKPOINT)
    arrays = read_reference_patch(TILE)
    exact = embed_arrays(model, arrays, device="cpu", precision="fp32").reshape(36, -1)
    reduced = embed_arrays(model, arrays, device="cpu", precision=precision).reshape(36, -1)
    np.testing.assert_array_equal(np.isnan(reduced), np.isnan(exact))
    observed = ~np.isnan(exact[:, 0])
    cosine = (exact[observed] * reduced[observed]).sum(-1) / (
        np.linalg.norm(exact[observed], axis=-1) * np.linalg.norm(reduced[observed], axis=-1))
    assert cosine.min() > 0.999


def test_batches_are_capped_at_the_teachers_size(tmp_path):
    """4,096 pixels of the full-size teacher would need tens of GB of activations on a CPU."""
    from tessera.models.engine import Embedder
    from tessera.options import InferOptions

    make_demo_checkpoint(tmp_path / "t.pt", "v2-teacher")
    model = load_model(tmp_path / "t.pt")
    assert Embedder(model, InferOptions(device="cpu", batch_pixels=4096)).batch_pixels == 512
    assert Embedder(model, InferOptions(device="cpu", batch_pixels=100)).batch_pixels == 100
