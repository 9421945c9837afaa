"""Checkpoints by name (v2-small, ...) or hf:// reference: resolved offline at parse time,
downloaded once by rule download from a Hugging Face stand-in (tests/hub_standin.py)."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import yaml
from hub_standin import HubStandIn

from tessera import config as tessera_config
from tessera.download import cached_path, checkpoint_path, download, hub_file, needs_download
from tessera.errors import UserError
from tessera.models import PUBLISHED, make_demo_checkpoint, published_checkpoint
from tessera.plan import make_plan

from conftest import BIN, TINY_ROI, job_stats, run_snakemake, write_tiny_config

SMALL = published_checkpoint("v2-small")


@pytest.fixture(scope="module")
def demo_small(tmp_path_factory) -> bytes:
    """A demo-made v2 (small) checkpoint: what the stand-in serves under the published name."""
    path = tmp_path_factory.mktemp("ckpt") / "student_small.pt"
    make_demo_checkpoint(path, family="v2", size="small")
    return path.read_bytes()


@pytest.fixture
def hub(demo_small):
    with HubStandIn({SMALL.repo_id: {SMALL.filename: demo_small, "README.md": b"# TESSERA v2 small\n"}}) as stand_in:
        yield stand_in


def test_published_names_resolve_offline_to_a_fixed_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    file = hub_file("v2-small")
    assert (file.repo_id, file.filename, file.family) == ("geotessera/TESSERA-V-2.0-2B-S", "ckpt/student_small.pt", "v2")
    assert cached_path(file) == tmp_path / "hf" / "tessera" / file.repo_id / "main" / file.filename
    assert checkpoint_path("v2-small", tmp_path / "c") == str(tmp_path / "c" / file.repo_id / "main" / file.filename)
    assert needs_download("v2-small", tmp_path / "c")
    assert {p.name for p in PUBLISHED} == {"v2-nano", "v2-small", "v2-medium", "v2-large", "v2-teacher"}
    ref = hub_file("hf://someone/models@v3/weights/encoder.pt")
    assert (ref.repo_id, ref.revision, ref.filename, ref.sha256) == ("someone/models", "v3", "weights/encoder.pt", None)
    local = tmp_path / "mine.pt"
    local.write_bytes(b"x")
    assert hub_file(str(local)) is None and checkpoint_path(str(local)) == str(local)


@pytest.mark.parametrize("checkpoint, message", [
    ("v1.1", "v1.1 checkpoints are not downloaded by name; get tessera_v1_1_{mpc,aws}_encoder.pt from the Google Drive"),
    ("v1.0-qat", "v1.0-qat checkpoints are not downloaded by name"),
    ("v2-tiny", "is not a file, a published name (v2-nano, v2-small"),
    ("hf://only-owner/file.pt", "is not a Hugging Face reference"),
])
def test_unusable_names_are_one_line_errors(tmp_path, checkpoint, message):
    config = tessera_config.validate({"roi": TINY_ROI, "year": 2024, "model": {"checkpoint": checkpoint}})
    with pytest.raises(UserError, match=None) as error:
        make_plan(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_published_name_sets_its_family_and_refuses_another(tmp_path):
    config = tessera_config.validate({"roi": TINY_ROI, "year": 2024, "model": {"checkpoint": "v2-teacher"}})
    assert config["model"]["family"] == "v2-teacher"
    make_plan(config)  # offline: nothing is downloaded, nothing needs to exist
    config = tessera_config.validate({"roi": TINY_ROI, "year": 2024,
                                      "model": {"checkpoint": "v2-small", "family": "v1.1"}})
    with pytest.raises(UserError, match="is a v2 checkpoint, but model.family is v1.1"):
        make_plan(config)


def test_download_once_through_the_cdn_redirect(hub, demo_small, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    digest = hashlib.sha256(demo_small).hexdigest()
    path = download("v2-small", tmp_path, sha256=digest)
    assert path == cached_path(hub_file("v2-small"), tmp_path) and path.read_bytes() == demo_small
    resolve = f"/{SMALL.repo_id}/resolve/main/{SMALL.filename}"
    assert hub.requests[("HEAD", "hub", resolve)] == 1
    assert [k for k in hub.requests if k[1] == "cdn" and k[0] == "GET"]  # the bytes came from the CDN
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no staging left behind
    before = sum(hub.requests.values())
    assert download("v2-small", tmp_path, sha256=digest) == path
    assert sum(hub.requests.values()) == before  # once: a cached file costs no request


def test_a_dropped_connection_resumes_where_it_stopped(demo_small, tmp_path, monkeypatch):
    # huggingface_hub writes what it reads in 10 MB pieces and, after a dropped connection, asks for
    # the rest from the last whole piece (file_download.http_get): cut the 28 MB file after 15 MB.
    with HubStandIn({SMALL.repo_id: {SMALL.filename: demo_small}}, cut_after=15_000_000) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = download("v2-small", tmp_path, sha256=hashlib.sha256(demo_small).hexdigest())
        assert path.read_bytes() == demo_small
        (asked,) = hub.ranges  # one more request, for the rest only
        assert 0 < int(asked.removeprefix("bytes=").rstrip("-")) <= 15_000_000


def test_a_file_that_differs_from_the_recorded_one_is_refused_and_removed(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(UserError, match=f"not the recorded {SMALL.size}"):
        download("v2-small", tmp_path)  # the stand-in's demo file is not the published one
    assert not cached_path(hub_file("v2-small"), tmp_path).exists()
    with pytest.raises(UserError, match="SHA-256 .* not the recorded 0000"):
        download("v2-small", tmp_path, sha256="0" * 64)


@pytest.mark.parametrize("reference, message", [
    ("hf://nobody/nothing/ckpt/x.pt", "repository nobody/nothing is not on"),
    (f"hf://{SMALL.repo_id}@v9/{SMALL.filename}", "revision 'v9' of geotessera/TESSERA-V-2.0-2B-S does not exist"),
    (f"hf://{SMALL.repo_id}/ckpt/student_huge.pt", "has no file 'ckpt/student_huge.pt' at main"),
])
def test_hub_errors_are_one_line(hub, tmp_path, monkeypatch, reference, message):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(UserError) as error:
        download(reference, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_unreachable_hub_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    result = subprocess.run([str(BIN / "tessera"), "download", "v2-nano", "--cache-dir", str(tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("tessera: error: v2-nano: geotessera/TESSERA-V-2.0-2B-N@main")
    assert "cannot be reached and is not in the cache" in result.stderr


def test_models_lists_families_names_sizes_and_sources(tmp_path):
    out = subprocess.run([str(BIN / "tessera"), "models", "--cache-dir", str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert "v2-small    v2" in out and "28.5 MB" in out and "TESSERA-V-2.0-2B-S ckpt/student_small.pt" in out
    assert "v1.1        not by name" in out and "Google Drive" in out


@pytest.mark.slow
def test_the_demo_runs_with_a_published_name(hub, demo_small, tmp_path, monkeypatch):
    """model.checkpoint: v2-small, end to end: one download job, then the demo as usual."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    cache = tmp_path / "models"
    config = write_tiny_config(tmp_path, model={"checkpoint": "v2-small", "cache_dir": str(cache),
                                                "sha256": hashlib.sha256(demo_small).hexdigest()})
    assert yaml.safe_load(config.read_text())["model"]["checkpoint"] == "v2-small"
    dry = run_snakemake(tmp_path, "--configfile", str(config), "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert job_stats(dry.stdout)["download"] == 1 and "demo_checkpoint" not in job_stats(dry.stdout)
    assert not cache.exists()  # reading the workflow downloads nothing
    result = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert cached_path(hub_file("v2-small"), cache).read_bytes() == demo_small
    log = (tmp_path / "logs" / "download.log").read_text()
    assert "student_small.pt: 100%" in log.replace("\r", "\n")  # the progress bar, in the job's log
    again = run_snakemake(tmp_path, "--configfile", str(config), "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    verify = subprocess.run([str(BIN / "tessera"), "verify", str(tmp_path / "results")], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
