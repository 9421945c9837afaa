import filecmp
import json
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pystac
import pystac_client
import pytest
import rasterio
from pyproj import Transformer
from pystac.extensions.projection import ProjectionExtension
from rasterio.windows import Window
from shapely import box
from shapely.geometry import shape

from tessera.demo import generate_catalog, serve_catalog
from tessera.demo.world import LandCover, World
from tessera.errors import UserError

# Straddles the UTM zone 31/32 boundary at 6°E, like the README demo, but much smaller.
BBOX = (5.998, 52.040, 6.002, 52.042)
SEED = 7
# Monthly S2 and bimonthly S1 dates keep the tests fast while covering the whole year.
THIN = {"s2_revisit_days": 30, "s1_revisit_days": 60}
S2_ASSETS = {"B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12", "SCL"}
CLEAR_LAND_SCL = (4, 5)
CLOUD_SCL = (8, 9)
SHADOW_SCL = 3


@pytest.fixture(scope="module")
def catalog_json(tmp_path_factory) -> Path:
    return generate_catalog(tmp_path_factory.mktemp("demo") / "catalog", 2024, BBOX, seed=SEED, **THIN)


@pytest.fixture(scope="module")
def items(catalog_json) -> list[pystac.Item]:
    return sorted(pystac.Catalog.from_file(str(catalog_json)).get_items(recursive=True), key=lambda item: (item.datetime, item.id))


def _s2(items):
    return [item for item in items if item.collection_id == "sentinel-2-l2a"]


def _s1(items):
    return [item for item in items if item.collection_id == "sentinel-1-rtc"]


def _read(item: pystac.Item, key: str, out_shape=None) -> tuple[np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    with rasterio.open(item.assets[key].get_absolute_href()) as src:
        return src.read(1, out_shape=out_shape), src.transform, src.crs


def _land_cover_of_pixels(shape_, transform, crs) -> np.ndarray:
    """Ground-truth class of each pixel centre, from the world's own definition."""
    rows, cols = np.mgrid[0 : shape_[0], 0 : shape_[1]]
    x, y = transform @ (cols + 0.5, rows + 0.5)
    lon, lat = Transformer.from_crs(crs, 4326, always_xy=True).transform(x, y)
    return World(SEED).land_cover(np.asarray(lon), np.asarray(lat))


def _epsg(item: pystac.Item) -> int:
    # pystac reads MPC's proj:epsg as projection v2 proj:code; the extension API knows both.
    return ProjectionExtension.ext(item).epsg


def _reflectance(dn: np.ndarray, item: pystac.Item) -> np.ndarray:
    offset = 1000 if item.properties["s2:processing_baseline"] >= "04.00" else 0
    return (dn.astype(np.float64) - offset) / 10000


# --- catalog structure ---------------------------------------------------------------------------


def test_catalog_has_both_collections_and_is_self_contained(catalog_json):
    catalog = pystac.Catalog.from_file(str(catalog_json))
    assert {child.id for child in catalog.get_children()} == {"sentinel-2-l2a", "sentinel-1-rtc"}
    assert catalog_json == catalog_json.parent / "catalog.json"
    # No leftover staging directories next to the finished catalog.
    assert [p.name for p in catalog_json.parent.parent.iterdir()] == ["catalog"]
    for item_json in catalog_json.parent.rglob("*_*/*.json"):
        written = json.loads(item_json.read_text())
        assert "proj:epsg" in written["properties"], "MPC items carry proj:epsg, not proj:code"
        for asset in written["assets"].values():
            assert asset["href"].startswith("./"), "asset hrefs must be relative so the server can rewrite them"


def test_s2_items_look_like_mpc_items(items):
    s2 = _s2(items)
    by_date = defaultdict(list)
    for item in s2:
        by_date[item.datetime].append(item)
    # Monthly dates over the whole year, two granules each, one per UTM zone of the bbox halves.
    dates = sorted(by_date)
    assert {(b - a).days for a, b in zip(dates, dates[1:])} == {THIN["s2_revisit_days"]}
    assert (dates[0].year, dates[0].month, dates[-1].year, dates[-1].month) == (2024, 1, 2024, 12)
    assert all(sorted(_epsg(i) for i in granules) == [32631, 32632] for granules in by_date.values())
    assert {item.properties["s2:mgrs_tile"] for item in s2} == {"31UGT", "32UKC"}
    for item in s2:
        assert set(item.assets) == S2_ASSETS
        for name in ("platform", "eo:cloud_cover", "s2:processing_baseline", "sat:orbit_state", "sat:relative_orbit", "s2:mgrs_tile"):
            assert name in item.properties
        assert item.properties["sat:orbit_state"] == "descending"
        assert 0 <= item.properties["eo:cloud_cover"] <= 100
    item = s2[0]
    for key, asset in item.assets.items():
        with rasterio.open(asset.get_absolute_href()) as src:
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and src.compression.name == "deflate"
            assert src.overviews(1), f"{key} has no overviews"
            assert src.nodata == 0
            assert src.dtypes[0] == ("uint8" if key == "SCL" else "uint16")
            assert src.crs.to_epsg() == _epsg(item)
            assert list(src.shape) == asset.extra_fields["proj:shape"]
            assert list(src.transform)[:6] == asset.extra_fields["proj:transform"]
            assert list(src.bounds) == asset.extra_fields["proj:bbox"]
            assert src.res == (asset.extra_fields["gsd"],) * 2


def test_s2_granules_of_a_date_overlap_in_the_middle_on_unrelated_grids(items):
    west, east = sorted(_s2(items)[:2], key=lambda item: _epsg(item))
    overlap = shape(west.geometry).intersection(shape(east.geometry))
    middle = box((BBOX[0] + 6.0) / 2, BBOX[1], (BBOX[2] + 6.0) / 2, BBOX[3])
    assert overlap.contains(middle)
    assert shape(west.geometry).union(shape(east.geometry)).contains(box(*BBOX))
    # The east granule's grid, taken into the west zone, is not a 10 m grid of the west zone.
    corner = Transformer.from_crs(32632, 32631, always_xy=True).transform(*east.assets["B04"].extra_fields["proj:transform"][2:6:3])
    assert all(abs(v / 10 - round(v / 10)) > 0.01 for v in corner)


def test_a_bbox_inside_one_zone_gets_two_distinctly_named_granules_per_date(tmp_path):
    # Both halves of this bbox lie east of 6°E: both granules are in zone 32, in one 100 km square.
    catalog = generate_catalog(tmp_path / "c", 2024, (6.0005, 52.040, 6.004, 52.042), s2_revisit_days=366, s1_revisit_days=366)
    s2 = _s2(pystac.Catalog.from_file(str(catalog)).get_items(recursive=True))
    assert len(s2) == 2 and len({item.id for item in s2}) == 2
    assert {_epsg(item) for item in s2} == {32632}
    assert sorted(item.properties["s2:mgrs_tile"] for item in s2) == ["32UKC", "32ULC"]


def test_overlapping_granules_show_the_same_surface(items):
    # On a cloud-free date both granules image the same ground: values at the same places agree
    # up to sensor noise and the half-pixel offset between the two zones' grids.
    clear = next(item for item in _s2(items) if item.properties["eo:cloud_cover"] == 0)
    pair = [item for item in _s2(items) if item.datetime == clear.datetime]
    lon, lat = np.meshgrid(np.linspace(5.9991, 6.0009, 20), np.linspace(BBOX[1], BBOX[3], 20))
    samples = []
    for item in pair:
        with rasterio.open(item.assets["B08"].get_absolute_href()) as src:
            x, y = Transformer.from_crs(4326, src.crs, always_xy=True).transform(lon.ravel(), lat.ravel())
            samples.append(np.array([v[0] for v in src.sample(zip(x, y))], dtype=float))
    assert np.corrcoef(*samples)[0, 1] > 0.9
    assert np.median(np.abs(samples[0] - samples[1]) / samples[0]) < 0.03


def test_s1_items_look_like_mpc_items(items):
    s1 = _s1(items)
    states = Counter(item.properties["sat:orbit_state"] for item in s1)
    assert set(states) == {"ascending", "descending"}
    for item in s1:
        assert set(item.assets) == {"vv", "vh"}
        assert item.properties["sar:polarizations"] == ["VV", "VH"]
        assert item.properties["sar:instrument_mode"] == "IW"
        assert len(item.properties["proj:transform"]) == 9
        for asset in item.assets.values():
            assert asset.extra_fields["raster:bands"] == [{"nodata": -32768, "data_type": "float32", "spatial_resolution": 10.0}]
            with rasterio.open(asset.get_absolute_href()) as src:
                assert src.dtypes[0] == "float32" and src.nodata == -32768 and src.res == (10.0, 10.0)
                assert src.crs.to_epsg() == _epsg(item)
                assert list(src.shape) == item.properties["proj:shape"]
    # Same-day, same-orbit slices of one datatake that overlap, each with no-data beyond its cut.
    passes = defaultdict(list)
    for item in s1:
        passes[item.datetime.date(), item.properties["sat:relative_orbit"]].append(item)
    pairs = [pair for pair in passes.values() if len(pair) == 2]
    assert len(pairs) >= 2 and all(len(p) <= 2 for p in passes.values())
    for first, second in pairs:
        assert shape(first.geometry).intersects(shape(second.geometry))
        assert first.properties["sat:absolute_orbit"] == second.properties["sat:absolute_orbit"]
        assert (_read(first, "vv")[0] == -32768).any()


# --- physical plausibility -----------------------------------------------------------------------


def test_clouds_are_bright_and_shadows_dark_where_scl_says_so(items):
    clouds = shadows = 0
    for item in _s2(items):
        scl, transform, crs = _read(item, "SCL")
        nir = _reflectance(_read(item, "B8A")[0], item)  # 20 m, on the SCL grid
        red_edge = _reflectance(_read(item, "B05")[0], item)
        land = np.isin(scl, CLEAR_LAND_SCL)
        if (scl == 9).any():
            clouds += 1
            assert red_edge[scl == 9].mean() > 0.4
        if np.isin(scl, CLOUD_SCL).any() and land.any():
            assert red_edge[np.isin(scl, CLOUD_SCL)].mean() > 2 * red_edge[land].mean()
        if (scl == SHADOW_SCL).any() and land.any():
            shadows += 1
            assert nir[scl == SHADOW_SCL].mean() < 0.5 * nir[land].mean()
    assert clouds >= 3 and shadows >= 3


def test_crop_ndvi_peaks_in_summer_and_forest_greens_up(items):
    mean_ndvi = defaultdict(dict)
    for item in _s2(items):
        if _epsg(item) != 32631:
            continue
        red = _reflectance(_read(item, "B04")[0], item)
        nir, transform, crs = _read(item, "B08")
        nir = _reflectance(nir, item)
        scl = _read(item, "SCL", out_shape=red.shape)[0]
        cover = _land_cover_of_pixels(red.shape, transform, crs)
        ndvi = (nir - red) / (nir + red)
        for land_cover in (LandCover.CROPLAND, LandCover.FOREST):
            usable = (cover == land_cover) & np.isin(scl, CLEAR_LAND_SCL)
            if usable.sum() > 20:
                mean_ndvi[land_cover][item.datetime.month] = ndvi[usable].mean()
    crop = mean_ndvi[LandCover.CROPLAND]
    assert max(crop, key=crop.get) in (5, 6, 7, 8)
    winter = [crop[m] for m in (1, 2, 3, 11, 12) if m in crop]
    assert winter and max(crop.values()) > max(winter) + 0.3
    forest = mean_ndvi[LandCover.FOREST]
    assert np.mean([forest[m] for m in (6, 7, 8) if m in forest]) > np.mean([forest[m] for m in (1, 2, 3, 12) if m in forest]) + 0.2


def test_s1_water_is_darker_than_forest_and_crops_grow_in_vh(items):
    crop_vh = {}
    for item in _s1(items):
        vv, transform, crs = _read(item, "vv")
        vh = _read(item, "vh")[0]
        cover = _land_cover_of_pixels(vv.shape, transform, crs)
        valid = vv != -32768
        water = vv[valid & (cover == LandCover.WATER)]
        forest = vv[valid & (cover == LandCover.FOREST)]
        assert 0.002 < np.median(water) < 0.012
        assert 0.07 < np.median(forest) < 0.13
        assert np.median(vh[valid & (cover == LandCover.FOREST)]) < 0.04
        crop_vh[item.datetime.month] = np.median(vh[valid & (cover == LandCover.CROPLAND)])
    assert max(crop_vh, key=crop_vh.get) in (5, 6, 7, 8)
    assert max(crop_vh.values()) > 2 * min(crop_vh.values())


def test_boa_offset_only_after_2022_01_25(tmp_path):
    # A 30-day revisit puts S2 dates on 2022-01-03 and 2022-02-02, either side of the change.
    catalog = generate_catalog(tmp_path / "c", 2022, BBOX, seed=SEED, **THIN)
    water_b12 = {}
    for item in pystac.Catalog.from_file(str(catalog)).get_items(recursive=True):
        if item.collection_id != "sentinel-2-l2a" or item.properties["eo:cloud_cover"] > 50:
            continue
        day = item.datetime.date()
        baseline = item.properties["s2:processing_baseline"]
        assert (baseline >= "04.00") == (day > date(2022, 1, 25))
        scl = _read(item, "SCL")[0]
        b12 = _read(item, "B12")[0]
        if (scl == 6).sum() > 5:
            water_b12[day] = np.median(b12[scl == 6])
    before = [v for d, v in water_b12.items() if d <= date(2022, 1, 25)]
    after = [v for d, v in water_b12.items() if d > date(2022, 1, 25)]
    assert before and after
    # Dark water in the SWIR is a few tens of DN, plus 1000 once the offset is applied.
    assert max(before) < 200 and all(1000 < v < 1200 for v in after)


# --- determinism and atomicity -------------------------------------------------------------------


def test_same_inputs_give_identical_files(catalog_json, tmp_path):
    again = generate_catalog(tmp_path / "again", 2024, BBOX, seed=SEED, **THIN)
    first = sorted(p.relative_to(catalog_json.parent) for p in catalog_json.parent.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again.parent) for p in again.parent.rglob("*") if p.is_file())
    assert first == second
    _, mismatch, errors = filecmp.cmpfiles(catalog_json.parent, again.parent, [str(p) for p in first], shallow=False)
    assert mismatch == [] and errors == []


def test_another_seed_gives_another_world(tmp_path):
    one_date = {"s2_revisit_days": 366, "s1_revisit_days": 366}
    pixels = []
    for seed in (1, 2):
        catalog = generate_catalog(tmp_path / str(seed), 2024, BBOX, seed=seed, **one_date)
        item = next(pystac.Catalog.from_file(str(catalog)).get_items("S2A_MSIL2A_20240103T104619_R008_T31UGT_20240103T123900", recursive=True))
        pixels.append(_read(item, "B08")[0])
    assert pixels[0].shape == pixels[1].shape and not np.array_equal(*pixels)


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    import tessera.demo.sentinel1 as demo_sentinel1

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(demo_sentinel1, "s1_items", fail)
    with pytest.raises(OSError):
        generate_catalog(tmp_path / "c", 2024, BBOX, s2_revisit_days=100)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "year, bbox",
    [(2014, BBOX), (2024, (6.0, 52.0, 5.9, 52.1)), (2024, (5.0, 52.0, 6.0, 52.1)), (2024, (5.0, 85.0, 5.1, 85.1))],
)
def test_unusable_inputs_are_user_errors(tmp_path, year, bbox):
    with pytest.raises(UserError, match="demo"):
        generate_catalog(tmp_path / "c", year, bbox)
    assert not (tmp_path / "c").exists()


# --- the STAC API server -------------------------------------------------------------------------


def _server_processes(catalog: Path) -> list[int]:
    """Pids whose environment serves this catalog (found through /proc, whoever started them)."""
    needle = f"CATALOG_HREF={catalog.resolve().as_uri()}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def _refuses_connections(url: str) -> bool:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_search_through_the_api_returns_the_catalog_items_with_readable_hrefs(catalog_json, items):
    search_bbox = (5.9985, 52.0405, 5.9995, 52.0415)  # west half only
    start, end = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 8, 31, 23, 59, 59, tzinfo=UTC)
    expected = {
        item.id for item in items
        if start <= item.datetime <= end and shape(item.geometry).intersects(box(*search_bbox))
    }
    with serve_catalog(catalog_json) as url:
        assert url.startswith("http://127.0.0.1:")
        client = pystac_client.Client.open(url)
        found = list(client.search(
            collections=["sentinel-2-l2a", "sentinel-1-rtc"], bbox=search_bbox, datetime="2024-05-01/2024-08-31"
        ).items())
        assert {item.id for item in found} == expected
        assert {item.collection_id for item in found} == {"sentinel-2-l2a", "sentinel-1-rtc"}
        s2 = next(item for item in found if item.collection_id == "sentinel-2-l2a")
        s1 = next(item for item in found if item.collection_id == "sentinel-1-rtc")
        local = {item.id: item for item in items}
        for item, key in ((s2, "B04"), (s2, "SCL"), (s1, "vh")):
            href = item.assets[key].href
            assert href.startswith(url), href
            window = Window(3, 4, 17, 9)
            with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(href) as remote:
                through_http = remote.read(1, window=window)
            with rasterio.open(local[item.id].assets[key].get_absolute_href()) as src:
                assert np.array_equal(through_http, src.read(1, window=window))
    assert _refuses_connections(url)
    assert _server_processes(catalog_json) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_server_is_stopped_when_the_block_raises(catalog_json, error):
    with pytest.raises(error):
        with serve_catalog(catalog_json) as url:
            assert _server_processes(catalog_json)
            raise error()
    assert _refuses_connections(url)
    assert _server_processes(catalog_json) == []


def test_server_dies_with_a_killed_parent(catalog_json):
    # SIGKILL runs no finally: the kernel's parent-death signal must stop the server.
    script = (
        "import sys, time\n"
        "from tessera.demo import serve_catalog\n"
        "with serve_catalog(sys.argv[1]) as url:\n"
        "    print(url, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(catalog_json)], stdout=subprocess.PIPE, text=True)
    try:
        url = parent.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and _server_processes(catalog_json)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _server_processes(catalog_json) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _server_processes(catalog_json) == []
    assert _refuses_connections(url)


def test_serving_a_missing_catalog_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="generate"):
        with serve_catalog(tmp_path / "catalog.json"):
            pass


def test_server_starts_inside_a_slurm_batch_job_environment(catalog_json, monkeypatch):
    # SLURM exports ENVIRONMENT=BATCH to batch jobs; stac-fastapi would read it as its mode.
    monkeypatch.setenv("ENVIRONMENT", "BATCH")
    with serve_catalog(catalog_json) as url:
        assert pystac_client.Client.open(url).get_collection("sentinel-1-rtc").id == "sentinel-1-rtc"
