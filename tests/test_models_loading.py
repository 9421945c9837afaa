"""The registry and safe, strict checkpoint loading: every bad checkpoint is a one-line UserError."""

import argparse
import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessera import config as cfg
from tessera import models
from tessera.errors import UserError
from tessera.models import checkpoint_sha256, family_names, get_family, load_model, make_demo_checkpoint
from tessera.models.family import Family

from conftest import VECTORS, needs_shared


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.pt"
    make_demo_checkpoint(path, "v2", seed=0)
    return path


def _demo_payload(demo: Path) -> dict:
    return torch.load(demo, weights_only=True)


def test_registry_holds_the_families_the_config_accepts():
    assert family_names() == cfg.schema()["properties"]["model"]["properties"]["family"]["enum"]
    assert all(get_family(name).name == name for name in family_names())
    with pytest.raises(UserError, match="config key 'model.family': 'v9' is not one of v2, v1.0"):
        cfg.validate({"roi": "6.0,52.0,6.1,52.1", "year": 2024, "model": {"family": "v9"}})


def test_the_registry_imports_no_model_code():
    """The Snakefile asks the registry for names when it is read: that must not import torch."""
    code = "import sys, tessera.models, tessera.config; tessera.config.schema(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("name", family_names())
def test_registry_facts_agree_with_the_family(name):
    """What assemble reads from the registry (without torch) is what the family's model code says."""
    entry, family = models.family_entry(name), get_family(name)
    assert entry.quantisation == family.quantisation
    assert entry.matryoshka == family.matryoshka
    assert entry.embedding_dims == family.embedding_dim(family.default_arch())


def test_registry_refuses_unknown_names():
    assert get_family("v2").name == "v2"
    assert get_family(get_family("v2")) is get_family("v2")
    with pytest.raises(UserError, match="model family 'v9' is unknown: use one of .*v2"):
        get_family("v9")


def test_loaded_model_is_eval_and_carries_family_and_arch(demo, caplog):
    with caplog.at_level(logging.INFO, logger="tessera.models"):
        model = load_model(demo)
    assert "detected model family v2" in caplog.text
    assert not model.training
    assert model.family is get_family("v2")
    assert model.arch["latent_dim"] == 64
    assert not any(p.requires_grad for p in model.parameters())


def test_checkpoint_sha256(demo):
    assert checkpoint_sha256(demo) == hashlib.sha256(demo.read_bytes()).hexdigest()


def test_compiled_prefix_stripped_and_training_heads_dropped(demo, tmp_path):
    payload = _demo_payload(demo)
    payload["model"] = {f"_orig_mod.{k}": v for k, v in payload["model"].items()}
    payload["model"]["_orig_mod.projector.net.0.weight"] = torch.zeros(4, 4)
    payload["model"]["segmented_matryoshka_projector.head.bias"] = torch.zeros(4)
    torch.save(payload, tmp_path / "compiled.pt")
    reference = load_model(demo)
    model = load_model(tmp_path / "compiled.pt", "v2")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_architecture_override_must_fit_the_weights(demo):
    with pytest.raises(UserError, match="shape .* the architecture arguments do not match"):
        load_model(demo, latent_dim=32)
    with pytest.raises(UserError, match="option.* hidden_size do not exist for family v2"):
        load_model(demo, hidden_size=3)


def test_args_as_namespace_load_without_trust(demo, tmp_path):
    payload = _demo_payload(demo)
    payload["args"] = argparse.Namespace(**payload["args"])
    torch.save(payload, tmp_path / "ns.pt")
    assert load_model(tmp_path / "ns.pt").arch["num_layers"] == 4


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's data (from /proc/self/maps), or None."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map of a Linux process")
def test_weights_are_the_checkpoint_file_mapped_not_a_copy(demo):
    model = load_model(demo)
    assert {_mapped_file(p) for p in model.parameters()} == {str(demo.resolve())}


def test_legacy_format_checkpoint_is_read_without_mapping(demo, tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save(_demo_payload(demo), legacy, _use_new_zipfile_serialization=False)
    reference, model = load_model(demo), load_model(legacy)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_weights_of_another_dtype_take_the_models(demo, tmp_path):
    payload = _demo_payload(demo)
    payload["model"] = {key: value.double() for key, value in payload["model"].items()}
    torch.save(payload, tmp_path / "float64.pt")
    model = load_model(tmp_path / "float64.pt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


class _Opaque:
    """Stands for any pickled object that is not a tensor or container."""


def test_non_tensor_pickle_needs_trust(demo, tmp_path):
    payload = _demo_payload(demo)
    payload["optimizer_hook"] = _Opaque()
    path = tmp_path / "pickled.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="--trust-checkpoint") as info:
        load_model(path)
    assert "pickled.pt" in str(info.value) and "\n" not in str(info.value)
    assert load_model(path, trust_checkpoint=True).family.name == "v2"


def test_truncated_file(demo, tmp_path):
    data = demo.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.pt' is truncated or not a PyTorch checkpoint"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(UserError, match="notes.pt"):
        load_model(path)
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "absent.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds a list, not a dict"):
        load_model(tmp_path / "list.pt")
    torch.save({"model": {"a.weight": torch.zeros(2)}, "args": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="is not a known TESSERA checkpoint"):
        load_model(tmp_path / "foreign.pt")


def test_non_tensor_state_entry(demo, tmp_path):
    payload = _demo_payload(demo)
    payload["model"]["dim_reducer.4.bias"] = [0.0] * 128
    torch.save(payload, tmp_path / "listentry.pt")
    with pytest.raises(UserError, match="'dim_reducer.4.bias' is a list, not a tensor"):
        load_model(tmp_path / "listentry.pt")


@needs_shared
def test_explicit_family_that_does_not_match(demo):
    v1_1 = VECTORS / "v1.1" / "checkpoint.pt"
    with pytest.raises(UserError, match=r"checkpoint '.*v1.1/checkpoint.pt' looks like family v1.1, not v2"):
        load_model(v1_1, "v2")
    with pytest.raises(UserError, match="looks like family v2, not v1.0-qat"):
        load_model(demo, "v1.0-qat")


class _GruFamily(Family):
    """A second family claiming v1.x keys, to make detection ambiguous."""

    name = "gru-standin"
    state_dict_keys = ("model_state_dict",)

    def matches_keys(self, keys):
        return any(".attn_pool.temporal_context." in k for k in keys)


@needs_shared
def test_ambiguous_detection_asks_for_the_family(monkeypatch):
    import tessera.models.checkpoint

    monkeypatch.setattr(tessera.models.checkpoint, "all_families", lambda: [*models.all_families(), _GruFamily()])
    with pytest.raises(UserError, match="could be any of v1.1, gru-standin: set the model family"):
        load_model(VECTORS / "v1.1" / "checkpoint.pt")


def test_explicit_family_without_any_match(tmp_path):
    torch.save({"model_state_dict": {"x.weight": torch.zeros(1)}}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="is not a v2 checkpoint"):
        load_model(tmp_path / "odd.pt", "v2")
