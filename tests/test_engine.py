"""The inference engine: v2 input preparation, no-data, determinism, batching, quantisation, patch reader."""

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from tessera.errors import UserError
from tessera.assemble import quantize
from tessera.infer import embed_reference_patch
from tessera.layout import read_reference_patch
from tessera.models.engine import Embedder, _prepared_ahead, cpu_threads, embed_arrays, resolve_precision
from tessera.options import InferOptions
from tessera.models import get_family, load_model
from tessera.models.family import Family, Quantisation
from tessera.models.v2 import STUDENT_NORMALISATION, pad_pattern

from conftest import VECTORS, needs_shared
TILE = VECTORS / "tile-level" / "tile" / "0_0_6_6"
V2 = get_family("v2")


@pytest.fixture(scope="module")
def model():
    return load_model(VECTORS / "v2-student" / "checkpoint.pt")


def inputs(batch, sensor: str) -> torch.Tensor:
    """A batch's inputs for one sensor in the reference layout (rows, T, C + 1), raw DOY last."""
    return torch.cat([getattr(batch, f"{sensor}_bands"), getattr(batch, f"{sensor}_doys")[..., None]], -1)


def synthetic_arrays(seed=0, height=7, width=9, t_s2=21, t_asc=7, t_desc=5):
    """Random reference-layout arrays with a no-data pixel, an S1-only and an S2-only pixel."""
    rng = np.random.default_rng(seed)
    arrays = {
        "bands": rng.integers(0, 10000, (t_s2, height, width, 10), dtype=np.uint16),
        "masks": (rng.random((t_s2, height, width)) < 0.6).astype(np.uint8),
        "doys": np.sort(rng.choice(np.arange(1, 366), t_s2, replace=False)).astype(np.uint16),
    }
    for orbit, steps in (("ascending", t_asc), ("descending", t_desc)):
        sar = rng.integers(1000, 9000, (steps, height, width, 2)).astype(np.int16)
        sar[rng.random((steps, height, width)) < 0.3] = 0
        sar[rng.random((steps, height, width)) < 0.1, 1] = 0  # VV alone still counts as valid
        arrays[f"sar_{orbit}"] = sar
        arrays[f"sar_{orbit}_doy"] = np.sort(rng.choice(np.arange(1, 366), steps, replace=False)).astype(np.int16)
    arrays["masks"][:, 0, 0] = 0  # (0, 0): nothing observed
    arrays["sar_ascending"][:, 0, 0] = arrays["sar_descending"][:, 0, 0] = 0
    arrays["masks"][:, 0, 1] = 0  # (0, 1): S1 only
    arrays["sar_ascending"][:, 0, 2] = arrays["sar_descending"][:, 0, 2] = 0  # (0, 2): S2 only
    return arrays


def naive_inputs(arrays, row, col):
    """One pixel's model inputs written straight from UPSTREAM.md §6.2, one pixel at a time."""
    norm = STUDENT_NORMALISATION

    def modality(values_by_part, doys_by_part, valid_by_part, means, stds):
        rows = []
        for values, doys, valid, mean, std in zip(values_by_part, doys_by_part, valid_by_part, means, stds):
            for t in np.flatnonzero(valid):
                z = (values[t].astype(np.float32) - np.float32(mean)) / (np.float32(std) + np.float32(1e-9))
                rows.append(np.r_[z, np.float32(doys[t])])
        n = len(rows)
        if n == 0:
            return np.zeros((1, len(values_by_part[0][0]) + 1), np.float32)
        length = min(-(-n // 8) * 8, 256)
        return np.stack([rows[i] for i in pad_pattern(n, length)]).astype(np.float32)

    s2 = modality([arrays["bands"][:, row, col]], [arrays["doys"]], [arrays["masks"][:, row, col] != 0],
                  [norm.s2_mean], [norm.s2_std])
    sar = [arrays["sar_ascending"][:, row, col], arrays["sar_descending"][:, row, col]]
    s1 = modality(sar, [arrays["sar_ascending_doy"], arrays["sar_descending_doy"]], [(v != 0).any(-1) for v in sar],
                  [norm.s1_asc_mean, norm.s1_desc_mean], [norm.s1_asc_std, norm.s1_desc_std])
    return s2, s1


def test_vectorised_preparation_matches_per_pixel_definition():
    arrays = synthetic_arrays()
    height, width = arrays["bands"].shape[1:3]
    seen = {}
    for batch in V2.prepare_batches(arrays, np.arange(height * width), data_kind="mpc", seed=0, batch_pixels=5):
        assert len(batch.pixels) <= 5
        for i, pixel in enumerate(batch.pixels):
            seen[int(pixel)] = (inputs(batch, "s2")[i].numpy(), inputs(batch, "s1")[i].numpy())
    assert 0 not in seen  # nothing observed: no-data, never computed
    assert len(seen) == height * width - 1
    for pixel, (s2, s1) in seen.items():
        expected_s2, expected_s1 = naive_inputs(arrays, *divmod(pixel, width))
        np.testing.assert_array_equal(s2, expected_s2)
        np.testing.assert_array_equal(s1, expected_s1)
    assert seen[1][0].shape == (1, 11) and not seen[1][0].any()  # S1-only pixel: one all-zero S2 row
    assert seen[2][1].shape == (1, 3) and not seen[2][1].any()


def test_more_than_256_observations_are_subsampled():
    arrays = synthetic_arrays(seed=1, height=1, width=3, t_s2=300, t_asc=3, t_desc=0)
    arrays["masks"][:] = 1
    arrays["doys"] = (np.arange(300) % 365 + 1).astype(np.uint16)
    batches = list(V2.prepare_batches(arrays, np.arange(3), data_kind="mpc", seed=0, batch_pixels=8))
    assert [len(b.pixels) for b in batches] == [2, 1]  # 8 pixels of 64 steps = 2 pixels of 256 steps
    s2 = torch.cat([inputs(b, "s2") for b in batches])
    assert s2.shape[1] == 256
    np.testing.assert_array_equal(s2[0, :, -1].numpy(), arrays["doys"][pad_pattern(300, 256)])


@needs_shared
def test_embed_arrays_no_data_valid_mask_and_batch_independence(model):
    arrays = synthetic_arrays()
    full = embed_arrays(model, arrays, device="cpu", batch_pixels=4096)
    assert full.dtype == np.float32 and full.shape == (7, 9, 32)
    assert np.isnan(full[0, 0]).all()
    assert np.isfinite(full.reshape(-1, 32)[1:]).all()
    small = embed_arrays(model, arrays, device="cpu", batch_pixels=3)
    np.testing.assert_allclose(small, full, atol=1e-5, rtol=0, equal_nan=True)
    valid = np.ones((7, 9), bool)
    valid[3:, 4:] = False
    masked = embed_arrays(model, arrays, valid=valid, device="cpu")
    assert np.isnan(masked[~valid]).all()
    np.testing.assert_allclose(masked[valid], full[valid], atol=1e-5, rtol=0, equal_nan=True)
    assert np.isnan(embed_arrays(model, arrays, valid=np.zeros((7, 9), bool), device="cpu")).all()


@needs_shared
def test_pixels_outside_valid_are_not_computed(model, monkeypatch):
    arrays = synthetic_arrays()
    valid = np.zeros((7, 9), bool)
    valid[2, 3] = valid[5, 5] = True
    computed = []
    original = type(V2).prepare_batches

    def spy(self, arrays, pixels, **kwargs):
        for batch in original(self, arrays, pixels, **kwargs):
            computed.extend(batch.pixels.tolist())
            yield batch

    monkeypatch.setattr(type(V2), "prepare_batches", spy)
    embed_arrays(model, arrays, valid=valid, device="cpu")
    assert sorted(computed) == [2 * 9 + 3, 5 * 9 + 5]


@needs_shared
def test_reruns_are_bit_identical(model):
    arrays = synthetic_arrays(seed=5)
    first = embed_arrays(model, arrays, device="cpu", seed=7)
    second = embed_arrays(model, arrays, device="cpu", seed=7)
    assert first.tobytes() == second.tobytes()


@needs_shared
def test_reference_tile_end_to_end(tmp_path):
    out = tmp_path / "emb.npy"
    embed_reference_patch(TILE, VECTORS / "v2-student" / "checkpoint.pt", "v2", out, options=InferOptions(device="cpu"))
    got = np.load(out)
    expected = np.load(VECTORS / "tile-level" / "expected.npz")["v2_student"]
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, equal_nan=True)


@needs_shared
def test_reader_fills_missing_sar_and_masks(tmp_path, model):
    patch = tmp_path / "patch"
    shutil.copytree(TILE, patch)
    for name in ("sar_descending", "sar_descending_doy", "masks"):
        (patch / f"{name}.npy").unlink()
    arrays = read_reference_patch(patch)
    assert arrays["sar_descending"].shape == (0, 6, 6, 2) and arrays["sar_descending_doy"].shape == (0,)
    assert arrays["masks"].shape == (30, 6, 6) and arrays["masks"].all()
    embedding = embed_arrays(model, arrays, device="cpu")
    assert np.isfinite(embedding).all()  # every S2 step counts as valid without masks.npy


@needs_shared
def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_reference_patch(tmp_path / "absent")
    patch = tmp_path / "patch"
    shutil.copytree(TILE, patch)
    np.save(patch / "doys.npy", np.arange(29, dtype=np.uint16))
    with pytest.raises(UserError, match=r"doys has shape \(29,\), expected \(30,\)"):
        read_reference_patch(patch)
    (patch / "bands.npy").unlink()
    with pytest.raises(UserError, match="has no bands.npy"):
        read_reference_patch(patch)


def test_quantize_v2():
    embedding = np.array([[[127.0, 0.5, 1.5, 2.5, -127.0]], [[np.nan] * 5], [[0.0] * 5]], np.float32)
    codes, scales = quantize(embedding, "v2")
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (3, 1)
    assert codes[0, 0].tolist() == [127, 0, 2, 2, -127]  # round half to even
    assert np.isnan(scales[1, 0]) and not codes[1].any()
    assert scales[2, 0] == np.float32(np.float32(1e-12) / np.float32(127)) and not codes[2].any()
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 5, 128)).astype(np.float32)
    codes, scales = quantize(values, V2)
    assert np.abs(codes.astype(np.float32) * scales[..., None] - values).max() <= scales.max() / 2 + 1e-7
    assert codes.min() >= -127


class _V1Quantised(Family):
    """The v1.x quantisation: codes down to -128, scale itself floored at 1e-8."""

    quantisation = Quantisation(code_min=-128, code_max=127, scale_floor=1e-8, floor_on_absmax=False)


def test_quantize_v1_style_parameters():
    codes, scales = quantize(np.array([[0.0, 0.0], [1e-7, -1e-7]], np.float32), _V1Quantised())
    assert scales.tolist() == [np.float32(1e-8), np.float32(1e-8)]  # max|e|/127 below the floor
    assert codes.tolist() == [[0, 0], [10, -10]]


def test_cpu_threads(monkeypatch):
    assert cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() >= 1
    with pytest.raises(UserError):
        cpu_threads(0)


@needs_shared
def test_unavailable_cuda_is_a_user_error(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="no usable CUDA"):
        embed_arrays(model, synthetic_arrays(), device="cuda")


# ---------------------------------------------------------------------------------------------
# The Embedder: batch-size invariance, precision, out-of-memory, background preparation

FAMILY_VECTORS = {"v1.0": "v1.0", "v1.0-qat": "v1.0-qat", "v1.1": "v1.1", "v2": "v2-student"}


def vector_model(family: str):
    """The small reference-vector model of a family (v1.0 checkpoints do not record their size)."""
    name = FAMILY_VECTORS[family]
    meta = json.loads((VECTORS / name / "meta.json").read_text())
    arch = meta["config"] if family in ("v1.0", "v1.0-qat") else {}
    return load_model(VECTORS / name / "checkpoint.pt", family, **arch)


@needs_shared
@pytest.mark.parametrize("family", list(FAMILY_VECTORS))
def test_embeddings_are_bit_identical_whatever_the_batch(family):
    model = vector_model(family)
    arrays = synthetic_arrays(seed=2, height=6, width=7)
    reference = embed_arrays(model, arrays, device="cpu", batch_pixels=4096)
    for batch_pixels in (1, 3, 13):
        again = embed_arrays(model, arrays, device="cpu", batch_pixels=batch_pixels)
        assert np.array_equal(again, reference, equal_nan=True), batch_pixels
    lonely = np.zeros((6, 7), bool)
    lonely[4, 5] = True  # alone in its batch and bucket
    alone = embed_arrays(model, arrays, valid=lonely, device="cpu")
    assert np.array_equal(alone[4, 5], reference[4, 5])


@needs_shared
@pytest.mark.parametrize("family", list(FAMILY_VECTORS))
def test_an_orbit_filtered_out_embeds_as_that_orbit_never_observed(family):
    """fetch.s1_orbit_state: the other direction's series is empty (T = 0), as the reference's
    stacker writes it and its inference concatenates it. The families that use every valid step
    (v2, v1.1) embed it as if that orbit's steps were all missing; the v1.0 families, which draw
    40 steps (from every step where a pixel has none valid), embed it too, with or without the
    other orbit (the QAT placeholder step where both are empty)."""
    model = vector_model(family)
    arrays = synthetic_arrays(seed=3, height=5, width=6)
    for orbit in ("ascending", "descending"):
        unobserved = {**arrays, f"sar_{orbit}": np.zeros_like(arrays[f"sar_{orbit}"])}
        empty = {**arrays, f"sar_{orbit}": arrays[f"sar_{orbit}"][:0], f"sar_{orbit}_doy": arrays[f"sar_{orbit}_doy"][:0]}
        embedded = embed_arrays(model, empty, device="cpu")
        assert np.isfinite(embedded[0, 1:]).all()  # every observed pixel, the S2-only one too
        if family in ("v2", "v1.1"):
            assert np.array_equal(embedded, embed_arrays(model, unobserved, device="cpu"), equal_nan=True), orbit
    no_s1 = {**arrays, **{f"sar_{orbit}{suffix}": arrays[f"sar_{orbit}{suffix}"][:0]
                          for orbit in ("ascending", "descending") for suffix in ("", "_doy")}}
    assert np.isfinite(embed_arrays(model, no_s1, device="cpu")[0, 2]).all()  # the S2-only pixel


@needs_shared
def test_deterministic_families_refuse_repeats(model):
    with pytest.raises(UserError, match="repeat_times = 2, but family v2 selects time steps deterministically"):
        embed_arrays(model, synthetic_arrays(), device="cpu", repeat_times=2)


def _cosine(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    keep = ~np.isnan(a[:, 0])
    a, b = a[keep], b[keep]
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@needs_shared
@pytest.mark.parametrize("family", list(FAMILY_VECTORS))
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_stays_close_to_fp32(family, precision):
    model = vector_model(family)
    arrays = synthetic_arrays(seed=3)
    exact = embed_arrays(model, arrays, device="cpu", precision="fp32")
    approximate = embed_arrays(model, arrays, device="cpu", precision=precision)
    assert approximate.dtype == np.float32
    assert np.array_equal(np.isnan(approximate), np.isnan(exact))
    assert not np.array_equal(approximate, exact, equal_nan=True)  # the reduced path really ran
    assert _cosine(approximate, exact).min() > 0.99
    assert torch.backends.mha.get_fastpath_enabled()  # int8 switches the fused attention off only while it runs
    if precision == "int8":
        assert isinstance(model.s2_backbone.embedding[0], torch.nn.Linear)  # the caller's model is untouched


def test_precision_choice(monkeypatch):
    v1_1, v2 = get_family("v1.1"), get_family("v2")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", v1_1, cpu) == "fp32"  # CPUs run fp32 unless asked
    # auto is what the reference runs: bf16 autocast on CUDA for v1.1 only (its config's apply_amp),
    # fp32 for v1.0 and v1.0-QAT (multi_tile_infer.py), the v2 students and the teacher (infer_v2.py).
    assert resolve_precision("auto", v1_1, cuda) == "bf16"
    for name in ("v2", "v1.0", "v1.0-qat", "v2-teacher"):
        assert resolve_precision("auto", get_family(name), cuda) == "fp32", name
        assert resolve_precision("bf16", get_family(name), cuda) == "bf16", name  # when asked
    assert resolve_precision("bf16", v2, cpu) == "bf16"
    with pytest.raises(UserError, match="int8 .* runs on the CPU only"):
        resolve_precision("int8", v2, cuda)
    with pytest.raises(UserError, match="precision 'fp16' is not one of auto, fp32, bf16, int8"):
        resolve_precision("fp16", v2, cpu)
    # A GPU without bfloat16 (before Ampere) runs fp32 on auto and refuses an explicit bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert resolve_precision("auto", v1_1, cuda) == "fp32"
    with pytest.raises(UserError, match="Tesla T4 has no bfloat16 support"):
        resolve_precision("bf16", v1_1, cuda)


class _MemoryLimited(torch.nn.Module):
    """A model that, like a full GPU, fails on passes of more than ``limit`` rows."""

    def __init__(self, model, limit):
        super().__init__()
        self.inner, self.limit, self.passes = model, limit, []
        self.family, self.arch = model.family, model.arch

    def encode(self, *inputs):
        self.passes.append(inputs[0].shape[0])
        if inputs[0].shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.encode(*inputs)


@needs_shared
def test_out_of_memory_halves_the_rows_per_pass(model, caplog):
    arrays = synthetic_arrays(seed=4)
    expected = embed_arrays(model, arrays, device="cpu")
    limited = _MemoryLimited(model, limit=20)
    embedder = Embedder(limited, InferOptions(device="cpu"))
    got = embedder.embed(arrays)
    assert np.array_equal(got, expected, equal_nan=True)  # padding keeps the halves bit-identical
    assert embedder.max_rows <= 20 and max(limited.passes[-3:]) <= 24
    assert "out of memory" in caplog.text
    with pytest.raises(UserError, match="ran out of memory for a single pixel"):
        Embedder(_MemoryLimited(model, limit=0), InferOptions(device="cpu")).embed(arrays)


def test_batches_prepared_ahead_arrive_in_order_and_errors_surface():
    def batches():
        yield from range(5)
        raise UserError("the stack is damaged: rerun the stack step")

    seen = []
    with pytest.raises(UserError, match="the stack is damaged"):
        for item in _prepared_ahead(batches(), lambda batch: batch * 10):
            seen.append(item)
    assert seen == [0, 10, 20, 30, 40]
    early = _prepared_ahead(iter(range(1000)), lambda batch: batch)
    assert next(early) == 0
    early.close()  # the consumer stops early: the background thread is stopped, not left blocked
    assert not [t for t in threading.enumerate() if t.name == "tessera-prepare-batches"]


def _mixed_patch(height: int = 5, width: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """S2 codes over the whole uint16 range, random clouds, S1 gaps, a pixel never observed."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((23, height, width)) < 0.6).astype(np.uint8)
    masks[:, 0, 0] = 0
    arrays = {"bands": rng.integers(0, 65536, (23, height, width, 10), dtype=np.uint16), "masks": masks,
              "doys": np.sort(rng.choice(np.arange(1, 366), 23, replace=False)).astype(np.uint16)}
    for orbit, steps in (("sar_ascending", 9), ("sar_descending", 7)):
        sar = rng.integers(1, 32768, (steps, height, width, 2), dtype=np.int16)
        sar[rng.random((steps, height, width)) < 0.3] = 0
        sar[:, 0, 0] = 0
        arrays[orbit] = sar
        arrays[f"{orbit}_doy"] = np.sort(rng.choice(np.arange(1, 366), steps, replace=False)).astype(np.int16)
    return arrays


@pytest.mark.parametrize("family", ["v1.0", "v1.1", "v2"])
def test_inputs_gathered_on_a_device_equal_those_gathered_by_numpy(family):
    """The GPU path of the preparation (gathering on the device), run here on the CPU device:
    the same tensors, bit for bit, as the numpy path."""
    arrays = _mixed_patch()
    chosen = get_family(family)
    pixels = np.arange(arrays["bands"].shape[1] * arrays["bands"].shape[2])
    options = dict(data_kind="aws" if family == "v1.1" else "mpc", seed=5, batch_pixels=7)
    on_cpu = list(chosen.prepare_batches(arrays, pixels, **options))
    on_device = list(chosen.prepare_batches(arrays, pixels, **options, device=torch.device("cpu")))
    assert len(on_cpu) == len(on_device) > 1
    for numpy_batch, device_batch in zip(on_cpu, on_device):
        np.testing.assert_array_equal(numpy_batch.pixels, device_batch.pixels)
        for name in ("s2_bands", "s2_doys", "s1_bands", "s1_doys"):
            assert torch.equal(getattr(numpy_batch, name), getattr(device_batch, name)), name
