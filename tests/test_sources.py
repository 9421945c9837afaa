import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pystac
import pytest
from urllib3.util.retry import Retry

import tessera.sources.stac as stac
from tessera.errors import UserError
from tessera.sources import Source, cached_search, open_source
from tessera.sources.mpc import MPC_ASSET_KEYS, mpc_shaped_source

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

    items = mpc_shaped_source("test", stac_api).search("sentinel-2-l2a", BBOX, 2024)
    assert sorted(item.id for item in items) == sorted(S2_INSIDE)
    assert all(item.collection_id == "sentinel-2-l2a" for item in items)
    href = next(item for item in items if item.id == "mid").assets["B04"].href
    assert href.startswith(stac_api) and href.endswith("B04.tif")


def test_search_of_an_unreachable_api_is_a_user_error(monkeypatch):
    monkeypatch.setattr(stac, "_SEARCH_RETRY", Retry(total=0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(UserError, match=f"source test: searching sentinel-2-l2a at http://127.0.0.1:{port} failed"):
        mpc_shaped_source("test", f"http://127.0.0.1:{port}").search("sentinel-2-l2a", BBOX, 2024)


class CountingSource(Source):
    """A source answering from a fixed list and counting its searches."""

    def search(self, collection, bbox_lonlat, year):
        self.searches.append((collection, year))
        return [_item("a", utc(year, 3, 1), collection)]


def counting_source(url):
    source = CountingSource("test", url, "sentinel-2-l2a", "sentinel-1-rtc", MPC_ASSET_KEYS, "mpc")
    object.__setattr__(source, "searches", [])
    return source


def test_search_cache_is_reused_only_for_the_same_query(tmp_path):
    cache = tmp_path / "search_s2.json"
    source = counting_source("http://127.0.0.1:1111")
    first = cached_search(source, "sentinel-2-l2a", BBOX, 2024, cache)
    again = cached_search(source, "sentinel-2-l2a", BBOX, 2024, cache)
    assert source.searches == [("sentinel-2-l2a", 2024)]
    assert [item.to_dict() for item in again] == [item.to_dict() for item in first]
    cached_search(source, "sentinel-2-l2a", BBOX, 2023, cache)
    assert source.searches == [("sentinel-2-l2a", 2024), ("sentinel-2-l2a", 2023)]
    cached_search(source, "sentinel-2-l2a", BBOX, 2023, None)
    assert len(source.searches) == 3


def test_cached_asset_hrefs_follow_the_api_to_its_new_port(tmp_path):
    cache = tmp_path / "search.json"
    old, new = counting_source("http://127.0.0.1:1111"), counting_source("http://127.0.0.1:2222/")
    item = cached_search(old, "sentinel-2-l2a", BBOX, 2024, cache)[0]
    item.assets["B04"].href = "http://127.0.0.1:1111/sentinel-2-l2a/a/B04.tif"
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "items": [item.to_dict(transform_hrefs=False)]}))
    rebased = cached_search(new, "sentinel-2-l2a", BBOX, 2024, cache)
    assert new.searches == []
    assert rebased[0].assets["B04"].href == "http://127.0.0.1:2222/sentinel-2-l2a/a/B04.tif"


def test_source_describes_its_assets_signing_and_harmonisation():
    signed = Source("s", "u", "c2", "c1", MPC_ASSET_KEYS, "none", sign=lambda href: href + "?sig=1")
    item = _item("a", utc(2024, 1, 1), "c2")
    item.assets["B04"].href = "https://example.org/B04.tif"
    assert signed.href(item, "B04") == "https://example.org/B04.tif?sig=1"
    with pytest.raises(KeyError, match="SCL"):
        signed.href(item, "SCL")
    values = np.array([999.0, 1000.0])
    assert signed.harmonise_s2(values, dt.date(2024, 1, 1)).tolist() == [999, 1000]
    with pytest.raises(ValueError, match="harmonisation"):
        Source("s", "u", "c2", "c1", MPC_ASSET_KEYS, "baseline")
    with pytest.raises(ValueError, match="SCL"):
        Source("s", "u", "c2", "c1", {k: v for k, v in MPC_ASSET_KEYS.items() if k != "SCL"}, "mpc")


def test_open_source_names_what_is_wrong():
    with pytest.raises(UserError, match="source 'aws' is unknown"):
        with open_source({"name": "aws"}):
            pass
    with pytest.raises(UserError, match="demo catalog"):
        with open_source("demo", demo_catalog=None):
            pass
