"""v2 students: reference vectors, strict loading of the published key layouts, demo checkpoints."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera import layout
from tessera.cli import main
from tessera.errors import UserError
from tessera.models import get_family, load_model, make_demo_checkpoint
from tessera.models.v2 import pad_pattern

from conftest import VECTORS, needs_shared
V2 = get_family("v2")


@needs_shared
@pytest.mark.parametrize("name", ["v2-student", "v2-student-qknorm"])
def test_reproduces_reference_vectors(name):
    meta = json.loads((VECTORS / name / "meta.json").read_text())
    model = load_model(VECTORS / name / "checkpoint.pt", "v2")
    assert model.arch["enable_qk_norm"] is meta["config"]["enable_qk_norm"]
    vectors = np.load(VECTORS / name / "vectors.npz")
    with torch.inference_mode():
        out = model(torch.from_numpy(vectors["s2_x"]), torch.from_numpy(vectors["s1_x"])).numpy()
    assert out.shape == (16, meta["output_dim"])
    np.testing.assert_allclose(out, vectors["expected"], atol=1e-4, rtol=1e-4)


def _published_checkpoint(path: Path, size: str, *, drop: str | None = None, add: str | None = None) -> Path:
    """Random tensors with the shapes of keys/v2-<size>.json in the published {"model", "args"} layout."""
    listing = json.loads((VECTORS / "keys" / f"v2-{size}.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in listing["keys"].items()}
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    args = {**listing["config"], "repr_dim": 128, "max_seq_len": 256, "matryoshka_dims": "16,32,64,128",
            "enable_qk_norm": False}
    torch.save({"model": state, "args": args}, path)
    return path


@needs_shared
@pytest.mark.parametrize("size", ["small", "large"])
def test_published_key_layout_loads_strictly(tmp_path, size):
    listing = json.loads((VECTORS / "keys" / f"v2-{size}.json").read_text())
    model = load_model(_published_checkpoint(tmp_path / "ckpt.pt", size))
    assert model.family is V2
    assert set(model.state_dict()) == set(listing["keys"])
    assert sum(p.numel() for p in model.parameters()) == listing["parameters"]
    assert model.arch["latent_dim"] == listing["config"]["latent_dim"]


@needs_shared
def test_missing_key_is_refused_by_name(tmp_path):
    key = "s1_backbone.transformer_encoder.layers.3.linear2.bias"
    path = _published_checkpoint(tmp_path / "ckpt.pt", "small", drop=key)
    with pytest.raises(UserError, match=r"missing s1_backbone\.transformer_encoder\.layers\.3\.linear2\.bias"):
        load_model(path, "v2")


@needs_shared
def test_extra_key_is_refused_by_name(tmp_path):
    path = _published_checkpoint(tmp_path / "ckpt.pt", "small", add="s2_backbone.extra_head.weight")
    with pytest.raises(UserError, match=r"unexpected s2_backbone\.extra_head\.weight") as info:
        load_model(path, "v2")
    assert "ckpt.pt" in str(info.value)


def test_pad_pattern_reference_cases():
    assert pad_pattern(5, 8).tolist() == [0, 1, 2, 3, 4, 1, 3, 4]  # UPSTREAM §6.2 example
    assert pad_pattern(2, 8).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]  # more missing than present: cycle
    assert pad_pattern(8, 8).tolist() == list(range(8))
    assert pad_pattern(300, 256)[[0, 1, -1]].tolist() == [0, 1, 299]  # linspace, truncated
    assert len(pad_pattern(1, 16)) == 16 and set(pad_pattern(1, 16)) == {0}


def test_bins():
    counts = np.array([0, 1, 8, 9, 17, 256, 257, 1000])
    assert V2.bins(counts).tolist() == [0, 8, 8, 16, 24, 256, 256, 256]


def test_demo_checkpoint_is_deterministic_published_and_labelled(tmp_path):
    first, second, other = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    make_demo_checkpoint(first, "v2", seed=3)
    make_demo_checkpoint(second, "v2", seed=3)
    make_demo_checkpoint(other, "v2", seed=4)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(first) == digest(second) != digest(other)
    raw = torch.load(first, weights_only=True)
    assert {"model", "args"} <= set(raw)
    assert "meaningless" in raw["tessera_demo"]
    assert raw["args"]["latent_dim"] == 64 and raw["args"]["dim_feedforward"] == 1024
    model = load_model(first)
    assert sum(p.numel() for p in model.parameters()) == 7_112_322  # published small size


def test_demo_checkpoint_unknown_size(tmp_path):
    with pytest.raises(UserError, match="size 'huge'"):
        make_demo_checkpoint(tmp_path / "x.pt", "v2", size="huge")


def test_tiny_demo_size_keeps_128_numbers_with_far_fewer_weights():
    arch = V2.demo_arch("tiny")
    assert arch["repr_dim"] == 128 and arch["num_layers"] == 1
    tiny, small = V2.build(**arch), V2.build(**V2.demo_arch("small"))
    count = [sum(p.numel() for p in model.parameters()) for model in (tiny, small)]
    assert count[0] * 50 < count[1], count


def test_cli_demo_checkpoint_tiny_loads_and_embeds_128(tmp_path):
    """The size reaches the checkpoint (its architecture and label); its weights' count is checked above."""
    assert main(["-q", "demo", "checkpoint", "--family", "v2", "--size", "tiny", "--work-dir", str(tmp_path)]) == 0
    tiny = layout.demo_checkpoint(tmp_path, "v2")
    assert "size tiny" in torch.load(tiny, weights_only=True)["tessera_demo"]
    model = load_model(tiny, "v2")
    assert model.arch["latent_dim"] == V2.demo_arch("tiny")["latent_dim"] and model.arch["num_layers"] == 1
    s2 = torch.cat([torch.randn(3, 16, 10), torch.randint(1, 366, (3, 16, 1)).float()], -1)
    s1 = torch.cat([torch.randn(3, 8, 2), torch.randint(1, 366, (3, 8, 1)).float()], -1)
    with torch.inference_mode():
        assert model(s2, s1).shape == (3, 128)


def test_cli_demo_checkpoint_unknown_size_is_one_error_line_and_no_file(tmp_path, capsys):
    code = main(["-q", "demo", "checkpoint", "--family", "v2", "--size", "huge", "--work-dir", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("tessera: error: ") and "size 'huge'" in err[0] and "tiny" in err[0], err
    assert not layout.demo_checkpoint(tmp_path, "v2").exists()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_output_is_layer_normalised_per_pixel(tmp_path):
    make_demo_checkpoint(tmp_path / "demo.pt")
    model = load_model(tmp_path / "demo.pt")
    generator = torch.Generator().manual_seed(1)
    s2 = torch.cat([torch.randn(4, 16, 10, generator=generator), torch.randint(1, 366, (4, 16, 1)).float()], -1)
    s1 = torch.cat([torch.randn(4, 8, 2, generator=generator), torch.randint(1, 366, (4, 8, 1)).float()], -1)
    with torch.inference_mode():
        out = model(s2, s1)
    assert out.shape == (4, 128)
    torch.testing.assert_close(out.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    # The same pixel alone and inside a batch: no cross-pixel leakage.
    with torch.inference_mode():
        torch.testing.assert_close(model(s2[:1], s1[:1]), out[:1], atol=1e-5, rtol=1e-5)
