"""Faults: a flaky network during a fetch, a permanently broken scene, damaged intermediates, a full disk.

Network faults come from ``faults.FaultyProxy`` between the fetch and the demo STAC API (a fresh
server per fetch, so that GDAL's per-process cache of remote files never answers for the network).
Timeouts and retry delays are shortened for the test; what is retried, and how often, is not.
"""

import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from shapely import box

import tessera.fetch
import tessera.fetch.reader
import tessera.sources.stac
from conftest import TINY_ROI
from faults import FaultPlan, FaultyProxy, corrupt_checkpoint_tensor, corrupt_cog, corrupt_stack_chunk, flip_byte, proxied, truncate
from tessera.cli import main
from tessera.demo import generate_catalog, serve_catalog
from tessera.errors import UserError
from tessera.period import DateRange
from tessera.fetch import fetch_s2
from tessera.grid import Tile, roi_in_tile, tiles_for_geometry, work_window
from tessera.layout import WorkTile
from tessera.models import load_model, make_demo_checkpoint
from tessera.roi import read_roi, write_roi_mask
from tessera.sources.mpc import mpc_shaped_source
from tessera.layout import read_patch_embedding, write_patch_embedding
from tessera.stack import Preprocessing, StackGrid, open_s2, write_s1, write_s2, write_stack_index

BBOX = (5.998, 52.040, 6.002, 52.042)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return generate_catalog(tmp_path_factory.mktemp("faults") / "demo", 2024, BBOX, seed=3,
                            s2_revisit_days=60, s1_revisit_days=90)


@pytest.fixture(scope="module")
def tile_window():
    tile = next(t for t, _ in tiles_for_geometry(box(*BBOX)) if t.epsg == 32632)
    return tile, work_window(tile, roi_in_tile(tile, box(*BBOX)))


@pytest.fixture(scope="module")
def quick_timeouts():
    """Stalls time out after 1 s (not 60) and retries wait 0.1 s (not 1 s, doubling): same retries, less waiting."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tessera.fetch.reader.GDAL_HTTP_OPTIONS, "GDAL_HTTP_TIMEOUT", "1")
        patch.setitem(tessera.fetch.reader.GDAL_HTTP_OPTIONS, "GDAL_HTTP_RETRY_DELAY", "0.1")
        patch.setattr(tessera.sources.stac, "_SEARCH_TIMEOUT_S", (2, 2))
        yield


def fetch(catalog: Path, tile_window, out: Path, plan: FaultPlan | None = None, **options) -> tuple[dict, FaultyProxy | None]:
    """fetch_s2 of the tile from a fresh demo API, through a FaultyProxy when ``plan`` is given."""
    tile, window = tile_window
    with serve_catalog(catalog) as url:
        source = mpc_shaped_source("demo", url, ephemeral_url=True)
        if plan is None:
            return fetch_s2(tile, window, 2024, source, out, patch_size=16, **options), None
        with FaultyProxy(plan) as proxy, proxied(proxy.url):
            return fetch_s2(tile, window, 2024, source, out, patch_size=16, **options), proxy


@pytest.fixture(scope="module")
def clean(catalog, tile_window, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "s2.zarr"
    report, _ = fetch(catalog, tile_window, out)
    assert report["skipped"] == {} and len(report["kept"]) >= 3
    return out


def assert_same_stack(one: Path, other: Path) -> None:
    a, b = open_s2(one), open_s2(other)
    assert a.series.dates == b.series.dates and a.series.scenes == b.series.scenes
    np.testing.assert_array_equal(a.bands[:], b.bands[:])
    np.testing.assert_array_equal(a.masks[:], b.masks[:])


# --- a flaky network -----------------------------------------------------------------------------


def test_fetch_through_a_network_failing_30_percent_of_requests_gives_the_clean_stack(
        catalog, tile_window, clean, quick_timeouts, tmp_path):
    """Server errors and stalls past the timeout, on searches and range reads alike: GDAL and
    pystac-client retry them, and the stack is the clean one, bit for bit."""
    report, proxy = fetch(catalog, tile_window, tmp_path / "s2.zarr", FaultPlan(share=0.3, kinds=("5xx", "stall"), seed=2, stall_seconds=2))
    assert report["skipped"] == {}
    assert_same_stack(tmp_path / "s2.zarr", clean)
    failed = sum(proxy.log.faults.values())
    assert failed >= 0.2 * len(proxy.log.requests) and proxy.log.faults["stall"] > 0, proxy.log.faults


@pytest.fixture(scope="module")
def dropped_connections(catalog, tile_window, quick_timeouts, tmp_path_factory):
    """A fetch where 10 % of the requests for scenes see a reset connection or a body cut short."""
    out = tmp_path_factory.mktemp("dropped") / "s2.zarr"
    report, proxy = fetch(catalog, tile_window, out, FaultPlan(share=0.1, kinds=("reset", "truncate"), targets=(".tif",), seed=2))
    assert proxy.log.faults["reset"] > 0 and proxy.log.faults["truncate"] > 0
    return out, report


def test_dropped_connections_never_lose_a_scene_silently(clean, dropped_connections):
    out, report = dropped_connections
    flaky, reference = open_s2(out), open_s2(clean)
    kept = {scene for step in flaky.series.scenes for scene in step}
    expected = {scene for step in reference.series.scenes for scene in step}
    assert kept <= expected
    assert expected - kept <= set(flaky.skipped), "a scene is missing from the stack without a record of why"
    assert set(report["skipped"]) == set(flaky.skipped)


def test_dropped_connections_are_retried_to_the_clean_stack(clean, dropped_connections):
    out, report = dropped_connections
    assert report["skipped"] == {}
    assert_same_stack(out, clean)


def test_an_outage_mid_tile_fails_the_tile_and_a_rerun_after_it_gives_the_clean_stack(
        catalog, tile_window, clean, quick_timeouts, tmp_path, monkeypatch):
    """Issue 12 (4, e): the source goes down in the middle of a tile's reads and stays down past
    every retry (minutes, shortened here by quick retry delays). Before, each failed read skipped
    its scene and the tile completed with fewer dates, for good."""
    from tessera.errors import SourceUnavailable

    monkeypatch.setitem(tessera.fetch.reader.GDAL_HTTP_OPTIONS, "GDAL_HTTP_MAX_RETRY", "2")
    monkeypatch.setattr(tessera.fetch.reader, "TRANSIENT_BACKOFF_S", 0.05)
    tile, window = tile_window
    out = tmp_path / "s2.zarr"
    with serve_catalog(catalog) as url:
        source = mpc_shaped_source("demo", url, ephemeral_url=True)
        with FaultyProxy(FaultPlan(targets=(".tif",), outage_after=40)) as proxy, proxied(proxy.url):
            with pytest.raises(SourceUnavailable) as failure:
                fetch_s2(tile, window, 2024, source, out, patch_size=16, search_cache=tmp_path / "search.json")
            assert proxy.log.faults["outage"] > 0 and "503" in str(failure.value) and "\n" not in str(failure.value)
            assert not out.exists()  # no partial stack, no scene recorded as skipped
            proxy.end_outage()
            report = fetch_s2(tile, window, 2024, source, out, patch_size=16, search_cache=tmp_path / "search.json")
    assert report["skipped"] == {}
    assert_same_stack(out, clean)


def test_the_cli_reports_an_outage_in_one_line_with_a_nonzero_exit(capsys, monkeypatch):
    from tessera.cli import main
    from tessera.errors import EXIT_SOURCE_UNAVAILABLE, SourceUnavailable

    def fail(args):
        raise SourceUnavailable("reading S2X B04 failed 4 times, each after GDAL's retries (HTTP response code: 503)")

    monkeypatch.setattr("tessera.cli.tools.cmd_plan", fail)  # looked up when the parser is built
    assert main(["plan", "--config", "x.yaml"]) == EXIT_SOURCE_UNAVAILABLE != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unavailable" in err[0] and "rerunning continues" in err[0] and "free space" not in err[0]


def _search(url: str, plan: FaultPlan) -> list[str]:
    feed = mpc_shaped_source("demo", url, ephemeral_url=True).s2
    with FaultyProxy(plan) as proxy, proxied(proxy.url):
        items = feed.search(BBOX, DateRange.whole_year(2024))
    assert sum(proxy.log.faults.values()) > 0
    return sorted(item.id for item in items)


def test_search_retries_server_errors_and_resets(catalog, quick_timeouts):
    with serve_catalog(catalog) as url:
        expected = sorted(item.id for item in mpc_shaped_source("demo", url).s2.search(BBOX, DateRange.whole_year(2024)))
        assert _search(url, FaultPlan(share=1.0, kinds=("5xx", "reset"), targets=("/search",), max_consecutive=2)) == expected


def test_search_retries_a_truncated_response(catalog, quick_timeouts):
    with serve_catalog(catalog) as url:
        expected = sorted(item.id for item in mpc_shaped_source("demo", url).s2.search(BBOX, DateRange.whole_year(2024)))
        assert _search(url, FaultPlan(share=1.0, kinds=("truncate",), targets=("/search",), max_consecutive=1)) == expected


# --- permanently broken scenes -------------------------------------------------------------------


def _a_kept_scene(clean: Path) -> str:
    return open_s2(clean).series.scenes[0][0]


def test_a_permanently_missing_asset_is_skipped_and_recorded(catalog, tile_window, clean, quick_timeouts, tmp_path):
    broken = _a_kept_scene(clean)
    plan = FaultPlan(broken=(rf"/{broken}/B04\.tif",))
    report, proxy = fetch(catalog, tile_window, tmp_path / "s2.zarr", plan)
    assert proxy.log.broken_hits > 0
    assert list(report["skipped"]) == [broken] and "B04" in report["skipped"][broken]
    stack = open_s2(tmp_path / "s2.zarr")
    assert broken not in {scene for step in stack.series.scenes for scene in step}
    assert stack.skipped == report["skipped"]


def test_a_permanently_missing_asset_below_min_scenes_fails_the_tile_naming_it(catalog, tile_window, clean, quick_timeouts, tmp_path):
    broken = _a_kept_scene(clean)
    dates = len(open_s2(clean).series)
    with pytest.raises(UserError) as error:
        fetch(catalog, tile_window, tmp_path / "s2.zarr", FaultPlan(broken=(rf"/{broken}/B04\.tif",)), min_scenes=dates + 1)
    message = str(error.value)
    assert "fetch.min_scenes" in message and broken in message and "\n" not in message
    assert not (tmp_path / "s2.zarr").exists() and list(tmp_path.iterdir()) == []


def test_a_corrupted_cog_is_skipped_and_recorded_not_read_as_data(catalog, tile_window, clean, tmp_path):
    damaged = tmp_path / "demo"
    shutil.copytree(catalog.parent, damaged)
    broken = _a_kept_scene(clean)
    corrupt_cog(damaged / "sentinel-2-l2a" / broken / "B08.tif")
    report, _ = fetch(damaged / "catalog.json", tile_window, tmp_path / "s2.zarr")
    assert list(report["skipped"]) == [broken] and "B08" in report["skipped"][broken]


# --- damaged intermediates -----------------------------------------------------------------------

TILE = Tile.from_name("grid_6.05_52.05")
WINDOW = Window(100, 100, 16, 16)
WHOLE_TILE_ROI = "6.0,52.0,6.1,52.1"  # at patch size 20 it has a patch r100_c100 over WINDOW


@pytest.fixture
def small_stack(tmp_path) -> Path:
    """stack.json over a 16 px window of synthetic values, with the tile's ROI mask next to it, in a
    work directory's layout (work/2024/<tile>/)."""
    tmp_path = WorkTile.at(tmp_path / "work", 2024, TILE.name).root
    grid = StackGrid(TILE.name, 2024, WINDOW, f"EPSG:{TILE.epsg}", TILE.window_transform(WINDOW), "demo", "mpc",
                     Preprocessing.expected_by("v2", "mpc"))
    rng = np.random.default_rng(1)
    with write_s2(tmp_path / "s2.zarr", grid, chunk=16) as s2:
        for day in (10, 70, 130, 190, 250):
            s2.append(dt.date(2024, 1, 1) + dt.timedelta(days=day), [f"s2-{day}"],
                      rng.integers(200, 5000, (16, 16, 10), dtype=np.uint16), np.ones((16, 16), np.uint8))
    with write_s1(tmp_path / "s1.zarr", grid, chunk=16) as s1:
        for day in (20, 140, 260):
            for orbit in ("ascending", "descending"):
                s1.append(orbit, dt.date(2024, 1, 1) + dt.timedelta(days=day), [f"s1-{day}"],
                          rng.integers(5000, 12000, (16, 16, 2), dtype=np.int16))
    write_stack_index(tmp_path / "s2.zarr", tmp_path / "s1.zarr", tmp_path / "stack.json")
    write_roi_mask(read_roi(WHOLE_TILE_ROI), TILE, tmp_path / "roi.tif")
    return tmp_path / "stack.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "v2.pt"
    make_demo_checkpoint(path, family="v2")
    return path


def _infer(stack: Path, checkpoint: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(os.sys.executable).parent / "tessera"), "-q", "infer", "--tile", TILE.name, "--year", "2024",
         "--work-dir", str(stack.parents[2]), "--roi", WHOLE_TILE_ROI, "--patch-size", "20", "--patch", "r100_c100",
         "--checkpoint", str(checkpoint), "--family", "v2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )


def test_a_corrupted_stack_chunk_is_never_embedded(small_stack, checkpoint):
    corrupt_stack_chunk(small_stack.parent / "s2.zarr", "bands")
    result = _infer(small_stack, checkpoint)
    assert result.returncode != 0
    assert not list((small_stack.parent / "patches").glob("*.npz"))


def test_a_corrupted_stack_chunk_is_one_clear_line(small_stack, checkpoint):
    corrupt_stack_chunk(small_stack.parent / "s2.zarr", "bands")
    result = _infer(small_stack, checkpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tessera: error: ")]
    assert len(errors) == 1 and "s2.zarr is damaged" in errors[0] and "run the workflow again" in errors[0]
    assert not (small_stack.parent / "s2.zarr").exists()  # removed, so that the next run fetches it again


def _assemble(tmp_path: Path, patch: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(os.sys.executable).parent / "tessera"), "-q", "assemble", "--tile", TILE.name, "--year", "2024",
         "--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "out"), "--family", "v2", str(patch)],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("damage", [lambda path: truncate(path, 0.9), flip_byte], ids=["truncated", "flipped byte"])
def test_a_damaged_patch_is_never_assembled(tmp_path, damage):
    work = WorkTile.at(tmp_path / "work", 2024, TILE.name)
    write_roi_mask(read_roi(WHOLE_TILE_ROI), TILE, work.roi_mask)
    patch = work.patch("r100_c100")
    write_patch_embedding(patch, np.random.default_rng(0).normal(size=(16, 16, 128)).astype(np.float32))
    assert _assemble(tmp_path, patch).returncode == 0  # the control: the whole patch assembles
    shutil.rmtree(tmp_path / "out")
    damage(patch)
    result = _assemble(tmp_path, patch)
    assert result.returncode == 2 and "r100_c100.npz is damaged" in result.stderr and "run the workflow again" in result.stderr
    assert not patch.exists()  # removed, so that the next run embeds it again
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_checkpoint_with_a_flipped_byte_is_refused(checkpoint, tmp_path):
    damaged = tmp_path / "damaged.pt"
    shutil.copyfile(checkpoint, damaged)
    corrupt_checkpoint_tensor(damaged)
    with pytest.raises(UserError, match="damaged.pt"):
        load_model(damaged)


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs (needs root, as in CI containers; skipped elsewhere)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill the disk up to ``leave_bytes`` of free space (tmpfs counts whole 4 KiB pages)."""
    (disk / "filler").unlink(missing_ok=True)
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    (disk / "filler").write_bytes(b"\0" * max(free - leave_bytes, 0))


def only_finals(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name != "filler")


def test_roi_mask_on_a_full_disk_keeps_the_previous_mask_at_every_fill_level(tiny_disk):
    """GDAL swallows a failed write at close; the mask is read back before it replaces the old one."""
    out = tiny_disk / "roi.tif"
    write_roi_mask(read_roi("6.0,52.0,6.1,52.1"), TILE, out)
    previous = out.read_bytes()
    smaller = read_roi("6.0,52.0,6.05,52.1")
    outcomes = set()
    for leave in range(0, 24 * 1024, 4096):
        fill(tiny_disk, leave)
        try:
            write_roi_mask(smaller, TILE, out)
            outcomes.add("written")
            with rasterio.open(out) as written:
                assert written.read(1).sum() < 0.6 * TILE.width * TILE.height
            write_roi_mask(read_roi("6.0,52.0,6.1,52.1"), TILE, out)
        except OSError:
            outcomes.add("refused")
            assert out.read_bytes() == previous
        assert only_finals(tiny_disk) == ["roi.tif"]
    assert outcomes == {"written", "refused"}


def test_stack_on_a_full_disk_keeps_the_previous_store(tiny_disk):
    grid = StackGrid(TILE.name, 2024, WINDOW, f"EPSG:{TILE.epsg}", TILE.window_transform(WINDOW), "demo", "mpc",
                     Preprocessing.expected_by("v2", "mpc"))
    rng = np.random.default_rng(2)

    def write(steps: int) -> None:
        with write_s2(tiny_disk / "s2.zarr", grid, chunk=16) as stack:
            for day in range(steps):
                stack.append(dt.date(2024, 1, 1) + dt.timedelta(days=day), [f"s{day}"],
                             rng.integers(0, 10000, (16, 16, 10), dtype=np.uint16), np.ones((16, 16), np.uint8))

    write(2)
    fill(tiny_disk, 8192)
    with pytest.raises(OSError):
        write(200)
    assert len(open_s2(tiny_disk / "s2.zarr").series) == 2
    assert only_finals(tiny_disk) == ["s2.zarr"]


def test_patch_embedding_on_a_full_disk_keeps_the_previous_file(tiny_disk):
    out = tiny_disk / "r0_c0.npz"
    previous = np.zeros((4, 4, 128), np.float32)
    write_patch_embedding(out, previous)
    fill(tiny_disk, 4096)
    with pytest.raises(OSError):
        write_patch_embedding(out, np.ones((64, 64, 128), np.float32))
    np.testing.assert_array_equal(read_patch_embedding(out), previous)
    assert only_finals(tiny_disk) == ["r0_c0.npz"]


def test_fetch_on_a_full_disk_fails_without_replacing_the_roi_mask(tiny_disk, tmp_path, capsys):
    work = WorkTile.at(tiny_disk, 2024, TILE.name)
    out = write_roi_mask(read_roi(TINY_ROI), TILE, work.roi_mask)
    previous = out.read_bytes()
    fill(tiny_disk, 0)
    assert main(["-q", "fetch", "--tile", TILE.name, "--year", "2024", "--work-dir", str(tiny_disk), "--output-dir",
                 str(tmp_path / "results"), "--roi", WHOLE_TILE_ROI, "--source", "demo"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("tessera: error: ") and "check the free space" in error[0]
    assert out.read_bytes() == previous and only_finals(work.root) == ["roi.tif"]


def test_cog_on_a_nearly_full_disk_never_replaces_the_previous_cog_with_a_broken_one(tiny_disk, tmp_path):
    from tessera.assemble import write_tile_cog

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    np.save(inputs / "codes.npy", rng.integers(-127, 128, (48, 48, 16)).astype(np.int8))
    np.save(inputs / "scales.npy", np.full((48, 48), 0.01, np.float32))
    write_roi_mask(read_roi(TINY_ROI), TILE, inputs / "landmask.tif")
    out = tiny_disk / "tile.tif"

    def write() -> None:
        write_tile_cog(inputs / "codes.npy", inputs / "scales.npy", inputs / "landmask.tif", out, tags={})

    write()
    previous = out.read_bytes()
    # The staging GeoTIFF and the COG both need room: a full disk can strike in either.
    for leave in range(0, 3 * len(previous) + 8192, 4096):
        fill(tiny_disk, leave)
        try:
            write()
        except (OSError, rasterio.errors.RasterioError, rasterio._err.CPLE_BaseError):
            pass
        if out.read_bytes() != previous:
            with rasterio.open(out) as written:
                written.read()  # a replaced COG must be whole
        assert only_finals(tiny_disk) == ["tile.tif"]
