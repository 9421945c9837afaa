import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pystac
import shapely
from shapely.geometry import shape
import pytest
from urllib3.util.retry import Retry

import tessera.sources.stac as stac
from tessera.errors import UserError
from tessera.period import DateRange
from tessera.sources import Source, cached_search, open_source, redact, stac_source
from tessera.sources.aws import EARTH_SEARCH_ASSET_KEYS
from tessera.sources.mpc import MPC_ASSET_KEYS, mpc_shaped_source
from tessera.sources import earthdata
from tessera.sources.opera import OperaFeed, _burst_item, _latest_per_burst
from tessera.sources.stac import RedactingFilter, StacFeed, UnusableAsset

from conftest import STAC_FIXTURES as FIXTURES, needs_shared

BBOX = (5.5, 52.1, 5.6, 52.2)


def utc(*args):
    return dt.datetime(*args, tzinfo=dt.timezone.utc)


def _item(item_id, when, collection, lon=5.55, lat=52.15):
    box = [lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01]
    geometry = {"type": "Polygon", "coordinates": [[[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]], [box[0], box[1]]]]}
    item = pystac.Item(item_id, geometry, box, when, {}, collection=collection)
    item.add_asset("B04", pystac.Asset(f"./{item_id}/B04.tif"))
    return item


S2_INSIDE = {
    "first-instant": utc(2024, 1, 1, 0, 0, 0),
    "mid": utc(2024, 6, 1, 10),
    "last-second": utc(2024, 12, 31, 23, 59, 59),
    "mid2": utc(2024, 7, 1, 10),
    "mid3": utc(2024, 8, 1, 10),
}
S2_OUTSIDE_YEAR = {"before": utc(2023, 12, 31, 23, 59, 59), "after": utc(2025, 1, 1, 0, 0, 0)}


@pytest.fixture(scope="module")
def stac_api(tmp_path_factory):
    """A real STAC API (stac-fastapi-static under uvicorn, in its own process) over a tiny catalog."""
    root = tmp_path_factory.mktemp("catalog")
    catalog = pystac.Catalog("test", "test")
    extent = pystac.Extent(pystac.SpatialExtent([[0, 0, 10, 60]]), pystac.TemporalExtent([[utc(2023, 1, 1), None]]))
    s2 = pystac.Collection("sentinel-2-l2a", "s2", extent)
    s1 = pystac.Collection("sentinel-1-rtc", "s1", extent)
    catalog.add_children([s2, s1])
    for item_id, when in {**S2_INSIDE, **S2_OUTSIDE_YEAR}.items():
        s2.add_item(_item(item_id, when, "sentinel-2-l2a"))
    s2.add_item(_item("elsewhere", utc(2024, 6, 1), "sentinel-2-l2a", lon=8.0, lat=50.0))
    s1.add_item(_item("radar", utc(2024, 6, 1), "sentinel-1-rtc"))
    catalog.normalize_hrefs(str(root))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "stac_fastapi.static.app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "CATALOG_HREF": f"file://{root}/catalog.json"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "STAC API did not start"
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_search_returns_every_page_of_the_utc_year_in_the_bbox(stac_api, monkeypatch):
    # Pages of 2 items: five matching items need three pages.
    monkeypatch.setattr(stac, "_PAGE_SIZE", 2)
    with urllib.request.urlopen(f"{stac_api}/search?collections=sentinel-2-l2a&limit=2") as response:
        first_page = json.load(response)
    assert len(first_page["features"]) == 2 and any(link["rel"] == "next" for link in first_page["links"])

    items = mpc_shaped_source("test", stac_api).s2.search(BBOX, DateRange.whole_year(2024))
    assert sorted(item.id for item in items) == sorted(S2_INSIDE)
    assert all(item.collection_id == "sentinel-2-l2a" for item in items)
    href = next(item for item in items if item.id == "mid").assets["B04"].href
    assert href.startswith(stac_api) and href.endswith("B04.tif")


def test_search_of_an_unreachable_api_is_a_user_error(monkeypatch):
    monkeypatch.setattr(stac, "_SEARCH_RETRY", Retry(total=0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(UserError, match=f"searching sentinel-2-l2a at http://127.0.0.1:{port} failed"):
        mpc_shaped_source("test", f"http://127.0.0.1:{port}").s2.search(BBOX, DateRange.whole_year(2024))


class CountingFeed(StacFeed):
    """A feed answering from a fixed list and counting its searches."""

    def search(self, bbox_lonlat, dates):
        self.searches.append(str(dates))
        return [_item("a", utc(dates.first.year, 3, 1), self.collection)]


def counting_source(url, ephemeral_url=False):
    feed = CountingFeed(url, "sentinel-2-l2a", MPC_ASSET_KEYS, ephemeral_url=ephemeral_url)
    object.__setattr__(feed, "searches", [])
    return Source("test", feed, feed, "mpc"), feed


def test_search_cache_is_reused_only_for_the_same_query(tmp_path):
    cache = tmp_path / "search_s2.json"
    source, feed = counting_source("http://127.0.0.1:1111")
    first = cached_search(source, feed, BBOX, DateRange.whole_year(2024), cache)
    again = cached_search(source, feed, BBOX, DateRange.whole_year(2024), cache)
    assert feed.searches == ["2024"]
    assert [item.to_dict() for item in again] == [item.to_dict() for item in first]
    written = json.loads(cache.read_text())
    assert written["type"] == "FeatureCollection" and [f["id"] for f in written["features"]] == ["a"]
    cached_search(source, feed, BBOX, DateRange.whole_year(2023), cache)
    assert feed.searches == ["2024", "2023"]
    cached_search(source, feed, BBOX, DateRange.whole_year(2023), None)
    assert len(feed.searches) == 3
    # A period of the year is another query.
    cached_search(source, feed, BBOX, DateRange(dt.date(2023, 4, 1), dt.date(2023, 9, 30)), cache)
    assert feed.searches[-1] == "2023-04-01..2023-09-30"
    # Another API of the same source name searches anew.
    other, other_feed = counting_source("http://127.0.0.1:2222")
    cached_search(other, other_feed, BBOX, DateRange.whole_year(2023), cache)
    assert other_feed.searches == ["2023"]


def test_cached_asset_hrefs_follow_an_ephemeral_api_to_its_new_port(tmp_path):
    cache = tmp_path / "search.json"
    (old, old_feed), (new, new_feed) = counting_source("http://127.0.0.1:1111", True), counting_source("http://127.0.0.1:2222/", True)
    item = cached_search(old, old_feed, BBOX, DateRange.whole_year(2024), cache)[0]
    item.assets["B04"].href = "http://127.0.0.1:1111/sentinel-2-l2a/a/B04.tif"
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "features": [item.to_dict(transform_hrefs=False)]}))
    rebased = cached_search(new, new_feed, BBOX, DateRange.whole_year(2024), cache)
    assert new_feed.searches == []
    assert rebased[0].assets["B04"].href == "http://127.0.0.1:2222/sentinel-2-l2a/a/B04.tif"


def test_feed_signs_hrefs_and_the_source_harmonises():
    class Signing:
        def sign(self, href):
            return href + "?sig=1"

        def forget(self, href):
            return True

    feed = StacFeed("u", "c2", MPC_ASSET_KEYS, Signing())
    item = _item("a", utc(2024, 1, 1), "c2")
    item.assets["B04"].href = "https://example.org/B04.tif"
    assert feed.href(item, "B04") == "https://example.org/B04.tif?sig=1"
    with pytest.raises(UnusableAsset, match="SCL"):
        feed.href(item, "SCL")
    source = Source("s", feed, feed, "none")
    values = np.array([999.0, 1000.0])
    assert source.harmonise_s2(values, item).tolist() == [999, 1000]
    with pytest.raises(ValueError, match="harmonisation"):
        Source("s", feed, feed, "baseline")
    with pytest.raises(ValueError, match="s2 asset key for bands \\['SCL'\\]"):
        Source("s", StacFeed("u", "c2", {k: v for k, v in MPC_ASSET_KEYS.items() if k != "SCL"}), feed, "mpc")


@needs_shared
def test_earth_search_assets_are_read_as_stored_but_only_as_l2a_dn():
    item = pystac.Item.from_dict(json.loads((FIXTURES / "earthsearch-sentinel-2-l2a-item-2023-10-08-S2A_13TDE.json").read_text()))
    feed = StacFeed("u", "sentinel-2-l2a", EARTH_SEARCH_ASSET_KEYS)
    # The item declares offset -0.1 (the baseline's -1000 DN) on data that already lack it: not applied.
    assert item.assets["red"].extra_fields["raster:bands"][0]["offset"] == -0.1
    assert feed.href(item, "B04") == item.assets["red"].href
    assert feed.href(item, "SCL").endswith("/SCL.tif")
    item.assets["red"].extra_fields["raster:bands"][0]["scale"] = 1.0
    with pytest.raises(UnusableAsset, match="asset 'red' has raster:bands scale 1.0, not 0.0001"):
        feed.href(item, "B04")


def test_redact_removes_signatures_and_tokens():
    signed = "'/vsicurl/https://a.blob.core.windows.net/c/x.tif?st=2025&se=2025&sp=rl&sig=AbC%3D' not recognized"
    assert redact(signed) == "'/vsicurl/https://a.blob.core.windows.net/c/x.tif?<redacted>' not recognized"
    assert redact("Authorization: Bearer eyJ0eXAi.abc") == "Authorization: Bearer <redacted>"
    record = logging.LogRecord("rasterio._env", logging.WARNING, "", 0, "HTTP error code: 500 - %s. Retrying",
                               ("https://h/x.tif?sig=S3CRET",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "HTTP error code: 500 - https://h/x.tif?<redacted>. Retrying"


def test_open_source_names_what_is_wrong():
    with pytest.raises(UserError, match="source 'gcs' is unknown: use one of demo, mpc, aws, stac"):
        with open_source({"name": "gcs"}):
            pass
    with pytest.raises(UserError, match="demo catalog"):
        with open_source("demo", demo_catalog=None):
            pass
    with pytest.raises(UserError, match="source 'mpc' takes no options \\(url\\)"):
        with open_source({"name": "mpc", "url": "x"}):
            pass


def test_stac_source_options():
    source = stac_source({"url": "https://example.org/v1", "s2_collection": "s2", "s1_collection": "s1",
                          "assets": {"B04": "red", "SCL": "scl", "mask": "layover"}, "harmonisation": "mpc"})
    assert source.s2.asset_keys["B04"] == "red" and source.s2.asset_keys["B02"] == "B02"
    assert source.s1.collection == "s1" and source.s1.asset_keys["mask"] == "layover" and source.harmonisation == "mpc"
    # v1.1's normalisation table follows what the data are: harmonised like MPC's, or as stored like Earth Search's.
    assert source.data_kind == "mpc"
    assert stac_source({"url": "u", "s2_collection": "a", "s1_collection": "b"}).data_kind == "aws"
    with pytest.raises(UserError, match="source stac: missing url, s1_collection"):
        stac_source({"s2_collection": "s2"})
    with pytest.raises(UserError, match="unknown option\\(s\\) colection"):
        stac_source({"url": "u", "s2_collection": "a", "s1_collection": "b", "colection": "c"})
    with pytest.raises(UserError, match="assets names unknown bands \\['B13'\\]"):
        stac_source({"url": "u", "s2_collection": "a", "s1_collection": "b", "assets": {"B13": "x"}})
    with pytest.raises(UserError, match="harmonisation 'aws' is unknown: use one of mpc, none"):
        stac_source({"url": "u", "s2_collection": "a", "s1_collection": "b", "harmonisation": "aws"})


# --- OPERA RTC-S1 and Earthdata credentials ------------------------------------------------------


@needs_shared
def test_a_real_opera_granule_becomes_an_s1_item():
    import asf_search
    from asf_search.search.search_generator import as_ASFProduct

    record = json.loads((FIXTURES / "cmr-umm-g-opera-l2-rtc-s1-granule-G2810724460-ASF.json").read_text())
    item = _burst_item(as_ASFProduct(record, asf_search.ASFSession()))
    assert item.id == "OPERA_L2_RTC-S1_T131-279916-IW1_20231202T162856Z_20231202T232622Z_S1A_30_v1.0"
    assert item.datetime == utc(2023, 12, 2, 16, 28, 56)
    assert item.properties["sat:orbit_state"] == "descending" and item.properties["opera:burst_id"] == "T131_279916_IW1"
    base = "https://datapool.asf.alaska.edu/RTC/OPERA-S1/" + item.id
    assert {key: asset.href for key, asset in item.assets.items()} == {
        "vv": base + "_VV.tif", "vh": base + "_VH.tif", "mask": base + "_mask.tif"}
    del item.assets["vv"]
    with pytest.raises(UnusableAsset, match="burst has no VV layer \\(polarisations VV\\+VH\\)"):
        OperaFeed().href(item, "vv")


def test_only_the_latest_processing_of_a_burst_is_kept():
    def burst(item_id, processed):
        item = pystac.Item(item_id, None, None, utc(2024, 5, 1, 5), {"opera:burst_id": "T1_2_IW1", "processing:datetime": processed})
        return item

    kept = _latest_per_burst([burst("old", "2024-05-01T09:00:00Z"), burst("new", "2024-09-01T09:00:00Z")])
    assert [item.id for item in kept] == ["new"]


@pytest.fixture
def no_earthdata_credentials(tmp_path, monkeypatch):
    for name in ("EARTHDATA_TOKEN", "EARTHDATA_TOKEN_FILE", "EARTHDATA_USERNAME", "EARTHDATA_PASSWORD", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_earthdata_token_from_the_environment_first(no_earthdata_credentials, monkeypatch):
    with pytest.raises(UserError, match="needs Earthdata Login credentials: set EARTHDATA_TOKEN"):
        earthdata.login()
    assert earthdata.credentials_kind() is None
    monkeypatch.setenv("EARTHDATA_TOKEN", " secret-77 \n")
    credentials = earthdata.login()
    assert credentials.token == "secret-77" and credentials.kind == "token from EARTHDATA_TOKEN"
    assert "secret-77" not in repr(credentials)


def test_earthdata_token_file_must_be_private(no_earthdata_credentials):
    token_file = no_earthdata_credentials / ".edl_bearer_token"
    token_file.write_text("file-token\n")
    token_file.chmod(0o644)
    with pytest.raises(UserError, match=f"Earthdata token file {token_file} is readable by others \\(mode 0644\\): run chmod 600"):
        earthdata.login()
    token_file.chmod(0o600)
    assert earthdata.login().token == "file-token"


def test_netrc_needs_the_earthdata_login_machine(no_earthdata_credentials):
    netrc = no_earthdata_credentials / ".netrc"
    netrc.write_text("machine example.org login a password b\n")
    netrc.chmod(0o600)
    with pytest.raises(UserError, match="gives no Earthdata Login credentials"):
        earthdata.login()
    netrc.chmod(0o640)
    with pytest.raises(UserError, match="readable by others"):
        earthdata.login()


def test_the_token_goes_only_to_earthdata_and_asf_hosts():
    assert earthdata.may_see_token("https://datapool.asf.alaska.edu/RTC/OPERA-S1/x_VV.tif")
    assert earthdata.may_see_token("https://cumulus.asf.earthdatacloud.nasa.gov/OPERA/x/x_VV.tif")
    assert earthdata.may_see_token("https://urs.earthdata.nasa.gov/oauth/authorize")
    assert not earthdata.may_see_token("https://asf-cumulus-prod-opera-products.s3.us-west-2.amazonaws.com/x?X-Amz-Signature=1")
    assert not earthdata.may_see_token("https://evilasf.alaska.edu.example.com/x")
    url = "https://b.s3.amazonaws.com/k?X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=s"
    assert earthdata.presigned_expiry(url) == dt.datetime(2024, 1, 1, 1, tzinfo=dt.timezone.utc).timestamp()


def test_pre_signed_hrefs_are_cached_without_their_signature_and_searched_again(tmp_path):
    class PreSigned(CountingFeed):
        def search(self, bbox_lonlat, dates):
            items = super().search(bbox_lonlat, dates)
            items[0].assets["B04"].href = "https://a.blob.core.windows.net/c/B04.tif?st=2026&se=2026&sp=rl&sig=S3CRET"
            items[0].add_asset("tilejson", pystac.Asset("https://example.org/tilejson.json?collection=x&item=a"))
            return items

    feed = PreSigned("https://api", "sentinel-2-l2a", MPC_ASSET_KEYS)
    object.__setattr__(feed, "searches", [])
    source = Source("test", feed, feed, "mpc")
    cache = tmp_path / "search_s2.json"
    items = cached_search(source, feed, BBOX, DateRange.whole_year(2024), cache)
    assert items[0].assets["B04"].href.endswith("sig=S3CRET")  # readable now
    written = cache.read_text()
    assert "S3CRET" not in written and "?collection=x&item=a" in written
    assert json.loads(written)["features"][0]["assets"]["B04"]["href"] == "https://a.blob.core.windows.net/c/B04.tif"
    cached_search(source, feed, BBOX, DateRange.whole_year(2024), cache)
    assert feed.searches == ["2024", "2024"]


# --- issue 12: tiles next to ±180° and at the grid's highest latitudes -----------------------------


@pytest.mark.parametrize("lon", [179.95, -179.95])
def test_searches_next_to_the_antimeridian_split_the_box_and_keep_only_nearby_items(lon, monkeypatch):
    """Issue 12 (3): before, the wrapped box (e.g. 179.898 ... -179.999) went out as one box and
    shapely.box of it spans the globe: the whole latitude band matched."""
    from shapely.geometry import mapping

    from tessera.fetch import window_bbox_lonlat
    from tessera.grid import tile_at

    tile = tile_at(lon, 10.05)
    bbox = window_bbox_lonlat(tile, tile.full_window)
    assert bbox[0] > bbox[2]  # the box crosses ±180°
    sent = []

    def item(item_id, x):
        geometry = mapping(shapely.box(x - 0.05, 10.0, x + 0.05, 10.1))
        return pystac.Item(item_id, geometry, list(shapely.box(x - 0.05, 10.0, x + 0.05, 10.1).bounds),
                           dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc), {}, collection="c")

    near = {"east": item("east", 179.95), "west": item("west", -179.95), "far": item("far", 0.0)}

    def all_pages(self, box_lonlat, start, end):
        sent.append(box_lonlat)
        west, _, east, _ = box_lonlat
        return [i for i in near.values() if shapely.box(*box_lonlat).intersects(shape(i.geometry))] + [near["far"]]

    monkeypatch.setattr(StacFeed, "_all_pages", all_pages)
    items = StacFeed("https://example.org", "c", MPC_ASSET_KEYS).search(bbox, DateRange.whole_year(2024))
    assert len(sent) == 2 and all(west <= east for west, _, east, _ in sent)
    assert {b[2] for b in sent} | {b[0] for b in sent} >= {180.0, -180.0}
    kept = {i.id for i in items}
    assert "far" not in kept and kept == {"east", "west"} & kept and kept
    assert stac.bbox_area(bbox).area < 1.0  # square degrees: not a band around the globe


def test_split_bbox():
    assert stac.split_bbox((1, 2, 3, 4)) == [(1, 2, 3, 4)]
    assert stac.split_bbox((179.9, 10, -179.99, 10.1)) == [(179.9, 10, 180.0, 10.1), (-180.0, 10, -179.99, 10.1)]


@pytest.mark.parametrize("lon, lat", [(6.05, 89.95), (179.95, 89.95), (-179.95, -89.95), (6.05, 83.95)])
def test_windows_at_the_grids_highest_latitudes_are_searched_where_they_are(lon, lat):
    from tessera.fetch import window_bbox_lonlat
    from tessera.grid import tile_at

    tile = tile_at(lon, lat)
    bbox = window_bbox_lonlat(tile, tile.full_window)
    area = stac.bbox_area(bbox)
    # Every pixel of the window lies inside the searched area (a 9 x 9 sample, corners included).
    from rasterio.warp import transform as warp

    cols, rows = np.meshgrid(np.linspace(0, tile.width, 9), np.linspace(0, tile.height, 9))
    xs, ys = tile.transform * (cols.ravel(), rows.ravel())
    lons, lats = warp(f"EPSG:{tile.epsg}", "EPSG:4326", xs, ys)
    assert all(area.buffer(1e-6).contains(shapely.Point(x, y)) for x, y in zip(lons, lats))
    assert -90 <= bbox[1] < bbox[3] <= 90
    # A window reaching the pole spans every longitude.
    pole = tile.project(shapely.Point(0, 90 if lat > 0 else -90))
    if tile.pixel_box(tile.full_window).intersects(pole):
        assert (bbox[0], bbox[2]) == (-180.0, 180.0)


def test_only_the_aws_source_imports_asf_search():
    """asf-search brings xarray and pandas (~0.5 s of CPU): every fetch of another source would pay it."""
    code = ("import sys, tessera.cli.stages, tessera.fetch, tessera.sources; "
            "print(sorted({'asf_search', 'xarray', 'pandas'} & set(sys.modules)))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
    code = "import sys, tessera.sources.aws; print('asf_search' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
