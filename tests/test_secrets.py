"""Secrets: Earthdata tokens, Planetary Computer keys and SAS signatures never reach a log, an error
message, provenance or a STAC item; credential files must be private; checkpoints run no code.

The workflow run here is the tiny demo with fake secrets in its environment and all of its HTTP
going through a ``FaultyProxy`` that plays an API handing out SAS-signed asset hrefs, fails a few
requests (GDAL's retry warnings name the URL) and refuses one asset for good (its skip reason does).
"""

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from shapely import box

from conftest import BIN, REPO, write_tiny_config
from faults import FaultPlan, FaultyProxy, proxied, proxy_environment, sign_asset_hrefs
from tessera.demo import generate_catalog, serve_catalog
from tessera.errors import UserError
from tessera.fetch import fetch_s2
from tessera.grid import roi_in_tile, tiles_for_geometry, work_window
from tessera.models import load_model, make_demo_checkpoint
from tessera.sources.mpc import mpc_shaped_source
from tessera.stack import open_s2

EARTHDATA_TOKEN = "EDL-FAKE-TOKEN-7f3a9c2e41"
PC_KEY = "PC-FAKE-SUBSCRIPTION-51d0b8"
SAS_SIGNATURE = "SASFAKESIG0ffee42"
SAS_QUERY = f"st=2026-01-01T00%3A00%3A00Z&se=2026-01-01T01%3A00%3A00Z&sp=rl&sv=2024-05-04&sr=c&sig={SAS_SIGNATURE}"
SECRETS = (EARTHDATA_TOKEN, PC_KEY, SAS_SIGNATURE)
# One asset the API never serves: the Sentinel-2 near infrared of the zone-31 granules.
BROKEN_ASSET = r"_T31\w+/B08\.tif"


def files_holding_secrets(root: Path, secrets=SECRETS) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            held = [s for s in secrets if s.encode() in data]
            if held:
                found[str(path.relative_to(root))] = held
    return found


# --- the workflow, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secrets")
    # Sparse synthetic dates: every code path of the tiny demo, fewer reads.
    # The broken asset skips every zone-31 granule: accepted here (fetch.max_skipped_pct), the run is about secrets.
    config = write_tiny_config(workdir, demo={"s2_revisit_days": 60, "s1_revisit_days": 90},
                               fetch={"max_skipped_pct": 100})
    plan = FaultPlan(share=0.05, kinds=("5xx",), max_consecutive=1, broken=(BROKEN_ASSET,))
    with FaultyProxy(plan, rewrite=sign_asset_hrefs(SAS_QUERY)) as proxy:
        env = {**proxy_environment(proxy.url), "EARTHDATA_TOKEN": EARTHDATA_TOKEN, "PC_SDK_SUBSCRIPTION_KEY": PC_KEY,
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        result = subprocess.run(
            [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(config),
             "--cores", "2"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (workdir / "snakemake.stdout").write_text(result.stdout)
    (workdir / "snakemake.stderr").write_text(result.stderr)
    return workdir, proxy


def test_the_run_really_used_signed_hrefs_and_met_faults(secret_run):
    """The control: without these, finding no secret would prove nothing."""
    workdir, proxy = secret_run
    asset_reads = [url for _, url, _ in proxy.log.requests if url.split("?")[0].endswith(".tif")]
    assert asset_reads and all(SAS_SIGNATURE in url for url in asset_reads)
    assert proxy.log.broken_hits > 0 and proxy.log.faults["5xx"] > 0
    skipped = [open_s2(p).skipped for p in (workdir / "work").glob("*/*/s2.zarr")]
    assert any(reason for stack in skipped for reason in stack.values())


def test_no_secret_in_results_logs_stacks_or_snakemake_records(secret_run):
    workdir, _ = secret_run
    leaks = files_holding_secrets(workdir)
    search_caches = {path for path in leaks if Path(path).name.startswith("search_")}
    assert {path: held for path, held in leaks.items() if path not in search_caches} == {}


def test_no_secret_in_search_caches(secret_run):
    workdir, _ = secret_run
    assert files_holding_secrets(workdir) == {}


def test_tokens_from_the_environment_are_sent_nowhere(secret_run):
    _, proxy = secret_run
    for _, url, headers in proxy.log.requests:
        sent = url + " " + " ".join(f"{k}: {v}" for k, v in headers.items())
        assert EARTHDATA_TOKEN not in sent and PC_KEY not in sent, url


# --- a fetch with a signer, in process ---------------------------------------------------------


class FakeSasSigner:
    """Signs like planetary-computer: a SAS query string appended right before each read."""

    def sign(self, href: str) -> str:
        return f"{href}?{SAS_QUERY}"

    def forget(self, href: str) -> bool:
        return False


def test_signed_reads_leave_no_signature_in_logs_errors_or_the_stack(tmp_path, caplog, capfd):
    bbox = (5.998, 52.040, 6.002, 52.042)
    catalog = generate_catalog(tmp_path / "demo", 2024, bbox, seed=4, s2_revisit_days=120, s1_revisit_days=120)
    tile = next(t for t, _ in tiles_for_geometry(box(*bbox)) if t.epsg == 32632)
    window = work_window(tile, roi_in_tile(tile, box(*bbox)))
    plan = FaultPlan(share=0.2, kinds=("5xx",), max_consecutive=1, broken=(BROKEN_ASSET,))
    caplog.set_level(logging.DEBUG)
    with serve_catalog(catalog) as url, FaultyProxy(plan) as proxy, proxied(proxy.url):
        source = mpc_shaped_source("demo", url, FakeSasSigner(), ephemeral_url=True)
        report = fetch_s2(tile, window, 2024, source, tmp_path / "s2.zarr", search_cache=tmp_path / "search.json",
                          patch_size=16)
        with pytest.raises(UserError) as error:
            fetch_s2(tile, window, 2024, source, tmp_path / "again.zarr", search_cache=tmp_path / "search.json",
                     patch_size=16, min_scenes=99)
    assert all(SAS_SIGNATURE in u for _, u, _ in proxy.log.requests if ".tif" in u)  # the reads were signed
    assert proxy.log.broken_hits > 0 and report["skipped"] and open_s2(tmp_path / "s2.zarr").skipped
    assert "B08" in str(error.value) and SAS_SIGNATURE not in str(error.value)
    printed = capfd.readouterr()
    assert SAS_SIGNATURE not in caplog.text + printed.out + printed.err + str(report)
    assert files_holding_secrets(tmp_path) == {}


# --- credential files -----------------------------------------------------------------------------

@pytest.fixture
def opera(monkeypatch, tmp_path):
    """The OPERA source's credential lookup, with a fresh HOME and no Earthdata variables."""
    module = pytest.importorskip("tessera.sources.earthdata")
    for name in ("EARTHDATA_TOKEN", "EARTHDATA_TOKEN_FILE", "EARTHDATA_USERNAME", "EARTHDATA_PASSWORD", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return module


@pytest.mark.parametrize("kind", ["token file", "netrc"])
def test_credential_files_readable_by_others_are_refused_without_showing_the_secret(opera, tmp_path, kind):
    home = tmp_path / "home"
    if kind == "token file":
        path, text = home / ".edl_bearer_token", EARTHDATA_TOKEN
    else:
        path, text = home / ".netrc", f"machine urs.earthdata.nasa.gov login someone password {EARTHDATA_TOKEN}\n"
    path.write_text(text)
    path.chmod(0o644)
    with pytest.raises(UserError) as error:
        opera.login()
    message = str(error.value)
    assert f"chmod 600 {path}" in message and EARTHDATA_TOKEN not in message and "\n" not in message
    if kind == "token file":  # a netrc's login is exchanged at Earthdata Login: tested against the stand-in
        path.chmod(0o600)
        assert opera.login().token == EARTHDATA_TOKEN
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_credentials_name_every_way_to_give_them(opera):
    with pytest.raises(UserError, match="EARTHDATA_TOKEN.*EARTHDATA_USERNAME.*edl_bearer_token.*netrc"):
        opera.login()


# --- checkpoints run no code ---------------------------------------------------------------------


class _MakesADirectory:
    """Unpickling this runs os.mkdir: any code a hostile checkpoint could carry."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    make_demo_checkpoint(tmp_path / "demo.pt", family="v2")
    payload = torch.load(tmp_path / "demo.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    payload["hook"] = _MakesADirectory(marker)
    torch.save(payload, tmp_path / "hostile.pt")
    with pytest.raises(UserError, match="hostile.pt.*holds more than tensors.*--trust-checkpoint"):
        load_model(tmp_path / "hostile.pt")
    assert not marker.exists()
    # The control: an unrestricted unpickler does run it.
    with open(tmp_path / "hostile.pt", "rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.is_dir()
