"""Sources mpc and aws against loopback stand-ins of the real services (tests/fixtures_servers.py):
paging, signing, asset mapping, offsets, OPERA bursts, credentials and failure paths."""

import datetime as dt
import io
import json
import logging
import os
import time
import types
from urllib.parse import urlparse

import numpy as np
import planetary_computer.sas
import planetary_computer.settings
import pystac
import pytest
import rasterio
import rasterio.errors
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window
from shapely import box

import tessera.fetch.reader as reader
import tessera.sources.earthdata as earthdata
import tessera.sources.mpc as mpc
import tessera.sources.stac as stac
from conftest import needs_shared
from fixtures_servers import (
    ASF_ADDRESSES,
    MPC_S2_BLOB,
    Asf,
    Cmr,
    Fault,
    Origin,
    Served,
    clear_gdal_http_cache,
    granule_name,
    opera_granule,
    publish,
    self_signed_certificate,
)
from tessera.demo import generate_catalog
from tessera.errors import SourceUnavailable, UserError
from tessera.fetch import fetch_s1, fetch_s2, print_scenes, window_bbox_lonlat
from tessera.fetch.encode import encode_s1
from tessera.layout import WorkTile
from tessera.grid import roi_in_tile, tiles_for_geometry, work_window
from tessera.period import DateRange
from tessera.sources import Source, open_source
from tessera.sources.aws import aws_source
from tessera.sources.mpc import mpc_source
from tessera.sources.stac import StacFeed
from tessera.stack import open_s1, open_s2

# The stand-in services serve the real STAC item JSON of shared/fixtures.
pytestmark = needs_shared

BBOX = (5.998, 52.040, 6.002, 52.042)  # across 6°E: S2 granules in UTM zones 31 and 32
YEAR = 2022  # dates either side of the baseline-04.00 offset (2022-01-25)
TOKEN = "edl-token-3f9c2a"
EDL_USER, EDL_PASSWORD = "alice", "s3cret-pw"
TILE = next(tile for tile, _ in tiles_for_geometry(box(*BBOX)) if tile.epsg == 32632)
WINDOW = work_window(TILE, roi_in_tile(TILE, box(*BBOX)))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return generate_catalog(tmp_path_factory.mktemp("demo") / "catalog", YEAR, BBOX, seed=3,
                            s2_revisit_days=90, s1_revisit_days=120)


@pytest.fixture(scope="module")
def services(catalog, tmp_path_factory):
    folder = tmp_path_factory.mktemp("services")
    certificate = self_signed_certificate(folder)
    origin, cmr = Origin(), Cmr(certificate)
    asf = Asf(certificate, username=EDL_USER, password=EDL_PASSWORD, token=TOKEN)
    with origin.server, cmr.server, asf, pytest.MonkeyPatch.context() as patch:
        published = publish(catalog, folder / "published", origin, cmr, TOKEN, asf=asf)
        patch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))  # asf-search talks HTTPS to the CMR stand-in
        patch.setenv("CURL_CA_BUNDLE", str(certificate[0]))  # and GDAL to the S3 stand-in
        patch.setenv("PC_SDK_SAS_URL", f"{origin.url}/mpc/api/sas/v1/token")
        # GDAL reaches the real *.blob.core.windows.net hrefs through the origin; loopback goes direct.
        patch.setenv("GDAL_HTTP_PROXY", f"127.0.0.1:{origin.server.port}")
        patch.setenv("NO_PROXY", ",".join(("127.0.0.1", *ASF_ADDRESSES.values())))
        patch.setenv("EARTHDATA_TOKEN", TOKEN)
        # Earthdata Login and ASF's hosts are the stand-ins' addresses.
        patch.setattr(earthdata, "EDL_HOST", asf.host("urs"))
        patch.setattr(earthdata, "AUTH_DOMAINS", (asf.host("datapool"), asf.host("gateway")))
        patch.setattr(mpc, "TOKEN_BACKOFF_BASE_S", 0.05)
        patch.setattr(reader, "TRANSIENT_BACKOFF_S", 0.05)
        # rasterio gives GDAL certifi's bundle: the stand-ins' certificate goes in as GDAL's option.
        patch.setitem(reader.GDAL_HTTP_OPTIONS, "GDAL_CURL_CA_BUNDLE", str(certificate[0]))
        patch.setitem(reader.GDAL_HTTP_OPTIONS, "GDAL_HTTP_RETRY_DELAY", "0.05")
        _fresh_planetary_computer_settings()
        yield origin, cmr, published, asf
    _fresh_planetary_computer_settings()


def _fresh_planetary_computer_settings():
    planetary_computer.settings.Settings.get.cache_clear()
    planetary_computer.sas.TOKEN_CACHE.clear()


@pytest.fixture
def origin(services):
    origin = services[0]
    origin.traffic.search_bodies.clear()
    origin.traffic.sas_requests.clear()
    yield origin
    origin.faults.clear()
    origin.accept_new_tokens = True
    origin.revoke_after_blob_reads = None


def fetch_tile(fetcher, source, out, **options):
    return fetcher(TILE, WINDOW, YEAR, source, out, **options)


def s2_scene_ids(published):
    footprint = box(*window_bbox_lonlat(TILE, WINDOW))
    return sorted(s.id for s in published.scenes if s.collection_id == "sentinel-2-l2a"
                  and footprint.intersects(box(*s.bbox)))


# --- search --------------------------------------------------------------------------------------


def test_mpc_search_follows_post_next_tokens_with_the_whole_body(services, origin, monkeypatch):
    published = services[2]
    monkeypatch.setattr(stac, "_PAGE_SIZE", 3)
    items = mpc_source(published.mpc_url).s2.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))
    assert sorted(item.id for item in items) == s2_scene_ids(published)
    bodies = origin.traffic.search_bodies
    assert len(bodies) == -(-len(items) // 3)  # pages of 3, the last one without a next link
    assert "token" not in bodies[0]
    for body in bodies[1:]:
        assert body["token"].startswith("next:sentinel-2-l2a:")
        assert {k: v for k, v in body.items() if k != "token"} == bodies[0]


def test_earth_search_body_only_next_links_keep_the_query_and_stop_at_the_empty_page(services, origin, monkeypatch):
    published = services[2]
    monkeypatch.setattr(stac, "_PAGE_SIZE", 4)
    items = aws_source(published.earth_search_url, published.cmr_host).s2.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))
    assert sorted(item.id for item in items) == s2_scene_ids(published)
    assert all(item.collection_id == "sentinel-2-l2a" for item in items)
    bodies = origin.traffic.search_bodies
    # Every non-empty page links onwards: 10 items in pages of 4 take 3 pages and an empty fourth.
    assert len(bodies) == len(items) // 4 + 2
    for body in bodies[1:]:
        assert set(body) == set(bodies[0]) | {"next"}
    # Taken literally, the link's body holds only `next`: the server then pages through everything,
    # a Landsat scene included. That is what the merge avoids.
    link_body = {"next": bodies[1]["next"]}
    literal = origin.earth_search.search({**link_body, "limit": 100})
    assert any(feature["collection"] == "landsat-c2-l2" for feature in literal["features"])


def test_search_is_cached_with_scene_ids_and_print_scenes_reads_no_pixels(services, origin, tmp_path):
    published = services[2]
    source = mpc_source(published.mpc_url)
    before = len(origin.traffic.responses)
    out = io.StringIO()
    print_scenes(source, TILE, WINDOW, YEAR, work=WorkTile(tmp_path), file=out)
    assert not any(path.endswith(".tif") for _, path, _, _ in origin.traffic.responses[before:])
    lines = out.getvalue().splitlines()
    assert lines[0] == f"{TILE.name} {YEAR} S2 from mpc: {len(s2_scene_ids(published))} scenes"
    first = lines[2].split()
    assert first[0] == "2022-01-03" and first[1] == "Sentinel-2A" and first[2:4] == ["descending", "R8"]
    assert 0 <= float(first[4]) <= 100 and 0 < float(first[5]) <= 100
    assert any(line.split()[2] == "ascending" for line in lines if "S1A_IW" in line)
    cached = json.loads((tmp_path / "search_s2.json").read_text())
    assert cached["type"] == "FeatureCollection"
    assert sorted(f["id"] for f in cached["features"]) == s2_scene_ids(published)
    searches = len(origin.traffic.search_bodies)
    print_scenes(source, TILE, WINDOW, YEAR, work=WorkTile(tmp_path), file=io.StringIO())
    assert len(origin.traffic.search_bodies) == searches


# --- the same pixels through every source --------------------------------------------------------


def test_one_tile_through_demo_mpc_and_aws_gives_identical_stacks(services, origin, catalog, tmp_path):
    published = services[2]
    stacks = {}
    with open_source("demo", demo_catalog=catalog) as demo:
        for name, source in (("demo", demo), ("mpc", mpc_source(published.mpc_url)),
                             ("aws", aws_source(published.earth_search_url, published.cmr_host))):
            # Nearest: the MPC rule (subtract 1000 from values >= 1000) is not linear, so applying it
            # after bilinear resampling (MPC) or before (Earth Search's files) differs next to dark pixels.
            s2 = fetch_tile(fetch_s2, source, tmp_path / name / "s2.zarr", resampling="nearest")
            # The same resampling for all: each source's default is the reference's for it.
            s1 = fetch_tile(fetch_s1, source, tmp_path / name / "s1.zarr", resampling="nearest")
            assert s2["skipped"] == {} and s1["skipped"] == {}, name
            stacks[name] = open_s2(tmp_path / name / "s2.zarr"), open_s1(tmp_path / name / "s1.zarr")
    demo_s2, demo_s1 = stacks["demo"]
    assert any(date > "2022-01-25" for date in demo_s2.series.dates) and any(
        date <= "2022-01-25" for date in demo_s2.series.dates)
    for name in ("mpc", "aws"):
        s2, s1 = stacks[name]
        assert s2.series.dates == demo_s2.series.dates and s2.series.scenes == demo_s2.series.scenes
        # Earth Search's DN already lack the offset and its raster:bands offset is not applied again;
        # MPC's lose it by the reference's rule: the same numbers either way.
        np.testing.assert_array_equal(s2.bands[:], demo_s2.bands[:])
        np.testing.assert_array_equal(s2.masks[:], demo_s2.masks[:])
        for orbit in ("ascending", "descending"):
            assert s1.orbit(orbit).dates == demo_s1.orbit(orbit).dates
            ours, demo = s1.orbit(orbit).arrays["sar"][:], demo_s1.orbit(orbit).arrays["sar"][:]
            if name == "mpc":
                np.testing.assert_array_equal(ours, demo)
            else:  # OPERA's gamma0 is encoded in float32 as the reference does (MPC's in float64): codes may differ by 1
                differ = ours.astype(np.int32) != demo
                assert np.abs(ours.astype(np.int32) - demo).max() <= 1 and differ.mean() < 1e-3, orbit
        assert s2.grid.source == name
    assert stacks["aws"][1].ascending.scenes[0][0].startswith("OPERA_L2_RTC-S1_T088-")


# --- Planetary Computer signing ------------------------------------------------------------------


def test_mpc_signs_each_read_and_signs_again_after_a_403(services, origin, tmp_path, monkeypatch):
    published = services[2]
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", "subscription-key-1")
    _fresh_planetary_computer_settings()
    origin.subscription_keys.clear()
    origin.revoke_after_blob_reads = 5  # tokens die mid-run, as long runs outlive them
    report = fetch_tile(fetch_s2, mpc_source(published.mpc_url), tmp_path / "s2.zarr")
    assert report["skipped"] == {}
    blob_statuses = origin.traffic.statuses("/sentinel2-l2/")
    assert blob_statuses[403] >= 1 and len(origin.traffic.sas_requests) >= 2
    assert set(origin.subscription_keys) == {"subscription-key-1"}
    account, container = MPC_S2_BLOB
    assert origin.traffic.sas_requests[0].endswith(f"/token/{account}/{container}")


def test_sas_tokens_never_reach_logs_errors_caches_or_stacks(services, origin, tmp_path, caplog):
    published = services[2]
    _fresh_planetary_computer_settings()
    caplog.set_level(logging.DEBUG)
    first_scl = next(s for s in published.scenes if s.collection_id == "sentinel-2-l2a")
    origin.faults[f"/sentinel2-l2/{first_scl.id}/SCL.tif"] = Fault(status=503, times=1)  # GDAL retries, naming the URL
    source = mpc_source(published.mpc_url)
    fetch_tile(fetch_s2, source, tmp_path / "ok.zarr", search_cache=tmp_path / "search_s2.json")
    assert "Retrying" in caplog.text and "?<redacted>" in caplog.text
    _fresh_planetary_computer_settings()
    origin.accept_new_tokens = False  # every signature is refused from now on
    with pytest.raises(UserError) as failure:  # a new source: a new signer, without the tokens it holds
        fetch_tile(fetch_s2, mpc_source(published.mpc_url), tmp_path / "refused.zarr", min_scenes=1)
    assert "403" in str(failure.value)
    issued = set(origin.issued_signatures)
    texts = [caplog.text, str(failure.value), (tmp_path / "search_s2.json").read_text(),
             json.dumps(dict(open_s2(tmp_path / "ok.zarr").skipped))]
    for text in texts:
        assert "sig=" not in text and not any(signature in text for signature in issued)


# --- OPERA RTC-S1 --------------------------------------------------------------------------------


def _cog(path, values, transform, nodata):
    with rasterio.open(path, "w", driver="COG", width=values.shape[1], height=values.shape[0], count=1,
                       dtype=values.dtype, crs=f"EPSG:{TILE.epsg}", transform=transform, nodata=nodata,
                       blocksize=128) as dst:
        dst.write(values, 1)
    return path


def test_opera_bursts_30m_mask_orbit_directions_and_polarisations(services, origin, tmp_path):
    _, cmr, published, asf = services
    # 30 m bursts on the tile's UTM grid, 5 pixels of margin around the work window.
    west, north = TILE.window_transform(WINDOW) @ (0, 0)
    transform = Affine(30, 0, west - 150, 0, -30, north + 150)
    rows, cols = -(-WINDOW.height // 3) + 10, -(-WINDOW.width // 3) + 10
    ramp = np.tile(0.05 + 0.01 * np.arange(cols, dtype=np.float32), (rows, 1))  # linear in x
    mask = np.zeros((rows, cols), np.uint8)
    mask[:, :8] = 2  # layover over the west of the window
    files = {"_VV.tif": _cog(tmp_path / "vv.tif", ramp, transform, np.nan),
             "_VH.tif": _cog(tmp_path / "vh.tif", ramp / 10, transform, np.nan),
             "_mask.tif": _cog(tmp_path / "mask.tif", mask, transform, 255)}
    when = dt.datetime(2023, 6, 1, 17, 25, tzinfo=dt.timezone.utc)
    granules = []
    for burst, orbit, layers in (("T088_300001_IW1", "ascending", files), ("T037_300002_IW2", "descending", files),
                                 ("T088_300003_IW3", "ascending", {"_mask.tif": files["_mask.tif"]})):
        scene = pystac.Item(burst, {"type": "Polygon", "coordinates": [list(box(*BBOX).exterior.coords)]}, list(BBOX),
                            when - dt.timedelta(hours=12 if orbit == "descending" else 0), {"sat:orbit_state": orbit,
                                                                                              "sat:relative_orbit": int(burst[1:4])})
        name = granule_name(scene, burst)
        granule = opera_granule(scene, {suffix: asf.add(name, name + suffix, file) for suffix, file in layers.items()}, burst)
        if burst.endswith("IW3"):  # an HH/HV burst (polar regions): no VV/VH files
            for attribute in granule["umm"]["AdditionalAttributes"]:
                if attribute["Name"] == "POLARIZATION":
                    attribute["Values"] = ["HH", "HV"]
            granule["umm"]["RelatedUrls"] = [u for u in granule["umm"]["RelatedUrls"] if "_V" not in u["URL"]]
        granules.append(granule)
    cmr.granules.extend(granules)
    try:
        source = aws_source(published.earth_search_url, published.cmr_host)
        report = fetch_s1(TILE, WINDOW, 2023, source, tmp_path / "s1.zarr", mask_layover=True)
        fetch_s1(TILE, WINDOW, 2023, source, tmp_path / "kept.zarr")  # the default: the reference's
    finally:
        for granule in granules:
            cmr.granules.remove(granule)
    stack = open_s1(tmp_path / "s1.zarr")
    assert stack.ascending.dates == stack.descending.dates == ("2023-06-01",)
    hh = next(item_id for item_id in report["skipped"] if "T088-300003-IW3" in item_id)
    assert "no VV layer (polarisations HH+HV)" in report["skipped"][hh]
    vv = stack.ascending.arrays["sar"][0, :, :, 0]
    # With mask_layover, masked (layover) pixels are no data; the rest is the 30 m ramp interpolated
    # bilinearly at 10 m.
    x_centres = (TILE.window_transform(WINDOW) * (np.arange(WINDOW.width) + 0.5, np.zeros(WINDOW.width)))[0]
    source_col = (x_centres - transform.c) / 30 - 0.5
    expected = encode_s1(0.05 + 0.01 * source_col)
    masked = source_col < 7.5  # nearest 30 m pixel is one of the 8 masked columns
    assert (vv[:, masked] == 0).all()
    unmasked = ~masked & (source_col > 8.5)
    assert np.abs(vv[:, unmasked].astype(int) - expected[unmasked]).max() <= 2
    assert (stack.descending.arrays["sar"][0][..., 0][:, unmasked] > 0).all()
    assert stack.grid.preprocessing.s1_layover == "masked"
    # By default the layover pixels are kept, as the reference keeps them (it never reads the mask).
    kept = open_s1(tmp_path / "kept.zarr")
    assert kept.grid.preprocessing.s1_layover == "kept"
    kept_vv = kept.ascending.arrays["sar"][0, :, :, 0]
    np.testing.assert_array_equal(kept_vv[:, ~masked], vv[:, ~masked])
    inside = masked & (source_col > 0.5)
    assert np.abs(kept_vv[:, inside].astype(int) - expected[inside]).max() <= 2


def _opera_only(published):
    return aws_source(published.earth_search_url, published.cmr_host)


def test_opera_reads_resolve_asf_redirects_and_give_gdal_only_the_presigned_url(services, origin, tmp_path, caplog):
    """Issue 12 (1): the token goes to datapool and the gateway (cross-host 307), never to S3; GDAL
    reads the presigned URL with no Authorization header (S3 would answer 400) and no token."""
    _, _, published, asf = services
    caplog.set_level(logging.DEBUG)
    asf.requests.clear()
    report = fetch_tile(fetch_s1, _opera_only(published), tmp_path / "s1.zarr")
    assert report["skipped"] == {} and report["kept"]
    datapool, gateway, s3 = asf.seen("datapool"), asf.seen("gateway"), asf.seen("s3")
    assert datapool and all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in datapool)
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for m, _, h in gateway if m == "GET")
    assert s3 and all("authorization" not in h for _, _, h in s3)
    assert all(m == "GET" for m, _, _ in s3)  # GDAL reads a presigned URL with GET, never HEAD
    # The URL GDAL got is presigned; no log holds the token or a signature.
    assert TOKEN not in caplog.text and "X-Amz-Signature=" not in caplog.text


def test_the_old_way_gdal_with_a_bearer_token_on_the_datapool_url_fails(services, tmp_path):
    """What the reader did before: the datapool URL and GDAL_HTTP_AUTH=BEARER. GDAL >= 3.10 drops
    Authorization at the cross-host redirect (OSGeo/gdal#10857); the gateway sends it to the login
    server, and nothing is read."""
    import rasterio

    _, _, published, asf = services
    url = next(iter(asf.objects))
    datapool_url = f"https://{asf.host('datapool')}/RTC/OPERA-S1/{url.rsplit('/', 1)[-1]}"
    clear_gdal_http_cache()
    with pytest.raises(rasterio.errors.RasterioIOError):
        with rasterio.Env(GDAL_HTTP_AUTH="BEARER", GDAL_HTTP_BEARER=TOKEN, GDAL_HTTP_MAX_RETRY="0"), rasterio.open(datapool_url):
            pass


def test_a_forwarded_authorization_header_is_refused_by_s3(services):
    import requests

    _, _, _, asf = services
    key = next(iter(asf.objects))
    presigned = asf._presign("GET", key)
    ca = os.environ["REQUESTS_CA_BUNDLE"]
    assert requests.get(presigned, verify=ca, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 400
    assert requests.get(presigned, verify=ca).status_code == 200
    head_signed = asf._presign("HEAD", key)
    assert requests.get(head_signed, verify=ca).status_code == 403  # signed for HEAD only


def test_expired_presigned_urls_are_resolved_again(services, tmp_path, monkeypatch):
    _, _, published, asf = services
    monkeypatch.setattr(asf, "url_lifetime_s", 1)
    monkeypatch.setattr(earthdata, "PRESIGNED_MARGIN_S", -5.0)  # keep using URLs past their expiry
    source = _opera_only(published)
    feed = source.s1
    item = feed.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))[0]
    first = feed.href(item, "vv")
    time.sleep(2.1)
    clear_gdal_http_cache()
    from tessera.fetch.reader import WindowReader

    reader = WindowReader(TILE, WINDOW, feed, 1)
    data, valid = reader.read(item, "vv", Resampling.nearest)
    assert valid.any() and np.isfinite(data[valid]).all()
    assert feed.href(item, "vv") != first  # resolved anew after S3's 403 "Request has expired"


@pytest.mark.parametrize("how", ["token", "username and password", "netrc", "token file"])
def test_each_way_of_giving_earthdata_credentials_reads_opera(services, tmp_path, monkeypatch, how, caplog):
    _, _, published, asf = services
    for name in ("EARTHDATA_TOKEN", "EARTHDATA_USERNAME", "EARTHDATA_PASSWORD", "EARTHDATA_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if how == "token":
        monkeypatch.setenv("EARTHDATA_TOKEN", TOKEN)
    elif how == "username and password":
        monkeypatch.setenv("EARTHDATA_USERNAME", EDL_USER)
        monkeypatch.setenv("EARTHDATA_PASSWORD", EDL_PASSWORD)
    elif how == "netrc":
        netrc = tmp_path / ".netrc"
        netrc.write_text(f"machine {asf.host('urs')} login {EDL_USER} password {EDL_PASSWORD}\n")
        netrc.chmod(0o600)
    else:
        token_file = tmp_path / ".edl_bearer_token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
    caplog.set_level(logging.DEBUG)
    report = fetch_tile(fetch_s1, _opera_only(published), tmp_path / "s1.zarr")
    assert report["skipped"] == {} and report["kept"]
    assert TOKEN not in caplog.text and EDL_PASSWORD not in caplog.text


def test_refused_earthdata_credentials_are_one_line_naming_the_fix(services, tmp_path, monkeypatch, caplog):
    _, _, published, asf = services
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("EARTHDATA_TOKEN", "wrong-token-77")
    with pytest.raises(UserError, match="did not accept the token from EARTHDATA_TOKEN") as failure:
        fetch_tile(fetch_s1, _opera_only(published), tmp_path / "wrong.zarr")
    assert "\n" not in str(failure.value) and "wrong-token-77" not in str(failure.value) + caplog.text
    monkeypatch.setenv("EARTHDATA_TOKEN", TOKEN)
    asf.eula_pending.add(TOKEN)
    try:
        with pytest.raises(UserError, match="EULA Acceptance Failure.*accept it at https://"):
            fetch_tile(fetch_s1, _opera_only(published), tmp_path / "eula.zarr")
    finally:
        asf.eula_pending.discard(TOKEN)
    monkeypatch.delenv("EARTHDATA_TOKEN")
    monkeypatch.setenv("EARTHDATA_USERNAME", EDL_USER)
    monkeypatch.setenv("EARTHDATA_PASSWORD", "not-the-password")
    with pytest.raises(UserError, match="refused the username and password"):
        fetch_tile(fetch_s1, _opera_only(published), tmp_path / "pw.zarr")


# --- failures of single reads --------------------------------------------------------------------


def _one_date_source(origin, published, tmp_path, name):
    """An Earth Search-shaped source of one clear date whose files sit under fresh URL paths
    (GDAL remembers what a URL answered)."""
    scene_ids = s2_scene_ids(published)
    items = []
    for item_dict in origin.earth_search.items:
        if item_dict["id"] in scene_ids[:2] and item_dict["collection"] == "sentinel-2-l2a":
            item = pystac.Item.from_dict(item_dict)
            for key, asset in item.assets.items():
                if asset.href.startswith(origin.url) and asset.href.endswith(".tif"):
                    old = asset.href[len(origin.url):]
                    new = f"/{name}{old}"
                    origin.files[new] = Served(origin.files[old].path)
                    asset.href = origin.url + new
            items.append(item)

    class Listed(StacFeed):
        def search(self, bbox_lonlat, dates):
            return items

    feed = Listed(origin.url, "sentinel-2-l2a", aws_source().s2.asset_keys)
    return Source("aws", feed, aws_source().s1, "none"), items


def test_http_500s_are_retried_by_gdal(services, origin, tmp_path):
    source, items = _one_date_source(origin, services[2], tmp_path, "retried")
    red = items[0].assets["red"].href[len(origin.url):]
    origin.faults[red] = Fault(status=500, times=2)
    report = fetch_tile(fetch_s2, source, tmp_path / "s2.zarr")
    assert report["skipped"] == {} and report["kept"]
    assert origin.traffic.statuses(red)[500] == 2


@pytest.mark.parametrize("fault", ["500", "stall"])
def test_a_read_failing_past_the_retries_fails_the_tile_instead_of_skipping_its_scene(services, origin, tmp_path,
                                                                                      monkeypatch, fault):
    """Issue 12 (4): before, the scene was "skipped" and the tile completed without it, for good."""
    source, items = _one_date_source(origin, services[2], tmp_path, f"failing-{fault}")
    monkeypatch.setitem(reader.GDAL_HTTP_OPTIONS, "GDAL_HTTP_MAX_RETRY", "1")
    monkeypatch.setitem(reader.GDAL_HTTP_OPTIONS, "GDAL_HTTP_TIMEOUT", "1")
    path = items[0].assets["scl"].href[len(origin.url):]
    origin.faults[path] = Fault(status=500, times=100) if fault == "500" else Fault(delay=3)
    with pytest.raises(SourceUnavailable) as failure:
        fetch_tile(fetch_s2, source, tmp_path / "s2.zarr")
    message = str(failure.value)
    assert items[0].id in message and "\n" not in message
    assert ("500" in message) if fault == "500" else ("timed out" in message.lower())
    assert not (tmp_path / "s2.zarr").exists()  # nothing partial, no scene recorded as skipped
    origin.faults.clear()  # the outage ends: the rerun completes the tile with every scene
    report = fetch_tile(fetch_s2, source, tmp_path / "s2.zarr")
    assert report["skipped"] == {} and report["kept"]


def test_a_truncated_cog_skips_its_scene_only(services, origin, tmp_path):
    source, items = _one_date_source(origin, services[2], tmp_path, "truncated")
    path = items[0].assets["nir"].href[len(origin.url):]
    whole = origin.files[path].path.read_bytes()
    (tmp_path / "cut.tif").write_bytes(whole[: len(whole) // 3])
    origin.files[path] = Served(tmp_path / "cut.tif")
    report = fetch_tile(fetch_s2, source, tmp_path / "s2.zarr")
    assert list(report["skipped"]) == [items[0].id] and "B08" in report["skipped"][items[0].id]
    assert report["kept"] and open_s2(tmp_path / "s2.zarr").series.scenes == ((items[1].id,),)


# --- issue 12: Planetary Computer's token service, CMR, Earth Search, the antimeridian -------------


def test_throttled_token_requests_are_retried_honouring_retry_after(services, origin, tmp_path, monkeypatch):
    published = services[2]
    origin.sas_throttle, origin.sas_retry_after = 2, "1"
    sleeps = []
    monkeypatch.setattr(mpc.time, "sleep", lambda seconds: sleeps.append(seconds))
    report = fetch_tile(fetch_s2, mpc_source(published.mpc_url), tmp_path / "s2.zarr")
    assert report["skipped"] == {} and report["kept"]
    assert origin.sas_throttle == 0 and len(sleeps) >= 2 and all(wait >= 1 for wait in sleeps[:2])


def test_a_token_service_down_past_the_retries_is_a_source_failure_not_a_disk_error(services, origin, tmp_path,
                                                                                     monkeypatch, capsys):
    """Issue 12 (2): before, requests' HTTPError (an OSError) escaped and the CLI said "check free space"."""
    from tessera.cli import main
    from tessera.errors import EXIT_SOURCE_UNAVAILABLE

    published = services[2]
    origin.sas_errors = 100
    monkeypatch.setattr(mpc, "TOKEN_BACKOFF_BASE_S", 0.0)
    try:
        with pytest.raises(SourceUnavailable, match="token service .* failed 6 times \\(HTTP 503\\)"):
            fetch_tile(fetch_s2, mpc_source(published.mpc_url), tmp_path / "s2.zarr")
        assert not (tmp_path / "s2.zarr").exists()

        def fetch_through_the_cli(args):
            fetch_tile(fetch_s2, mpc_source(published.mpc_url), tmp_path / "cli.zarr")

        monkeypatch.setattr("tessera.cli.tools.cmd_plan", fetch_through_the_cli)  # any command: its error handling
        assert main(["-q", "plan", "--config", "unused.yaml"]) == EXIT_SOURCE_UNAVAILABLE
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "free space" not in err and "rerunning continues" in err
    finally:
        origin.sas_errors = 0


def _refused_blob_reads(origin) -> int:
    return sum(1 for host, _, status, _ in origin.traffic.responses if host.endswith(".blob.core.windows.net") and status == 403)


def _s2_stack_values(path):
    stack = open_s2(path)
    return stack.series.dates, stack.series.scenes, stack.bands[:], stack.masks[:]


def test_a_token_that_expires_mid_tile_is_renewed_after_the_refusal(services, origin, tmp_path):
    """Issue 12 (2): the storage's clock passes the token's expiry between two reads of a tile (a
    slow tile), while the client still holds it as valid: the refused read signs anew and the tile
    completes, equal to a fetch that never saw an expiry."""
    published = services[2]
    clean = fetch_tile(fetch_s2, mpc_source(published.mpc_url), tmp_path / "clean.zarr")
    requests_before, refused_before = len(origin.traffic.sas_requests), _refused_blob_reads(origin)
    origin.advance_clock_after_blob_reads = (5, dt.timedelta(hours=1, minutes=1))
    try:
        report = fetch_tile(fetch_s2, mpc_source(published.mpc_url), tmp_path / "s2.zarr")
    finally:
        origin.advance_clock_after_blob_reads, origin.clock_offset = None, dt.timedelta(0)
    assert report["skipped"] == {} and report["kept"] == clean["kept"]
    assert _refused_blob_reads(origin) > refused_before  # the storage did refuse the old token
    assert len(origin.traffic.sas_requests) - requests_before >= 2  # the first token, then a renewal
    for ours, theirs in zip(_s2_stack_values(tmp_path / "s2.zarr"), _s2_stack_values(tmp_path / "clean.zarr")):
        np.testing.assert_array_equal(ours, theirs)


def test_a_containers_token_reads_its_blobs_and_not_another_containers(services, origin):
    """The stand-in's tokens are container SAS tokens, as MPC's: the fetch's signing per container
    is what makes its reads work, not a storage that takes any live token."""
    from tessera.fetch.reader import GDAL_HTTP_OPTIONS

    feed = mpc_source(services[2].mpc_url).s2
    item = feed.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))[0]
    signed = feed.href(item, "B04")
    account = urlparse(signed).hostname.split(".")[0]
    other = signed.split("?")[0] + "?" + feed.signer.token(account, "another-container")
    refused_before = _refused_blob_reads(origin)
    with rasterio.Env(**GDAL_HTTP_OPTIONS, CPL_VSIL_CURL_NON_CACHED="/vsicurl/https"):
        with rasterio.open(signed) as src:
            assert src.width > 0
        with pytest.raises(rasterio.errors.RasterioIOError, match="403"):
            rasterio.open(other)
    assert _refused_blob_reads(origin) > refused_before


def test_a_token_within_the_margin_of_its_expiry_is_renewed_before_use(services, origin, monkeypatch):
    """The client's side: a token within ``TOKEN_REFRESH_MARGIN_S`` of its ``msft:expiry`` is not
    used again; a new one is asked for before the storage would refuse it (the client's clock moves on)."""
    late = {"by": 0.0}
    monkeypatch.setattr(mpc, "time", types.SimpleNamespace(time=lambda: time.time() + late["by"], sleep=time.sleep))
    signer, account, container = mpc.PlanetaryComputerSigner(), "sentinel2l2a01", "sentinel2-l2"
    requests_before = len(origin.traffic.sas_requests)
    first = signer.token(account, container)
    late["by"] = 3600 - mpc.TOKEN_REFRESH_MARGIN_S - 5  # just outside the margin of the hour's expiry
    assert signer.token(account, container) == first and len(origin.traffic.sas_requests) == requests_before + 1
    late["by"] = 3600 - mpc.TOKEN_REFRESH_MARGIN_S + 5  # within it
    assert signer.token(account, container) != first and len(origin.traffic.sas_requests) == requests_before + 2


def test_an_incomplete_cmr_answer_fails_the_search_instead_of_losing_bursts(services, monkeypatch):
    """Issue 12 (5): asf-search logs an incomplete page and returns what it has."""
    import asf_search.constants.INTERNAL as internal

    _, cmr, published, _ = services
    monkeypatch.setattr(internal, "CMR_PAGE_SIZE", 2)
    feed = _opera_only(published).s1
    complete = feed.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))
    assert len(complete) > 2  # more than one page
    cmr.short_pages = 1
    try:
        with pytest.raises(SourceUnavailable, match="incompletely"):
            feed.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))
    finally:
        cmr.short_pages = 0


def test_earth_search_keeps_the_latest_processing_of_a_scene(services, origin):
    published = services[2]
    items = aws_source(published.earth_search_url, published.cmr_host).s2.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))
    assert not any(item.id.endswith("_0_L2A") for item in items)
    listed = origin.earth_search.search({"collections": ["sentinel-2-l2a"], "limit": 1000})["features"]
    assert any(feature["id"].endswith("_0_L2A") for feature in listed)  # the service does list both


def test_opera_searches_next_to_the_antimeridian_send_two_boxes(services):
    from tessera.grid import tile_at

    _, cmr, published, _ = services
    tile = tile_at(-179.95, -16.05)
    bbox = window_bbox_lonlat(tile, tile.full_window)
    cmr.requests.clear()
    _opera_only(published).s1.search(bbox, DateRange.whole_year(YEAR))
    boxes = [tuple(map(float, form["bounding_box"][0].split(","))) for form in cmr.requests]
    assert len(boxes) == 2 and all(west <= east for west, _, east, _ in boxes)
    assert sum(east - west for west, _, east, _ in boxes) < 1.0


# --- issue 12 (f): tessera check-source against the stand-ins -------------------------------------


def _check(source):
    from tessera.sources.check import check_source

    out = io.StringIO()
    report = check_source(source, TILE, WINDOW, YEAR, file=out)
    return report, out.getvalue()


def test_check_source_passes_for_demo_mpc_aws_and_stac(services, origin, catalog, monkeypatch, caplog):
    from tessera.sources import stac_source

    published = services[2]
    caplog.set_level(logging.DEBUG)
    with open_source("demo", demo_catalog=catalog) as demo:
        sources = {"demo": demo, "mpc": mpc_source(published.mpc_url),
                   "aws": aws_source(published.earth_search_url, published.cmr_host),
                   "stac": stac_source({"url": published.mpc_url, "s2_collection": "sentinel-2-l2a",
                                        "s1_collection": "sentinel-1-rtc", "harmonisation": "mpc",
                                        "signing": "planetary-computer"})}
        for name, source in sources.items():
            started = time.monotonic()
            report, text = _check(source)
            assert report.ok, text
            assert time.monotonic() - started < 60
            assert report.scenes["S2"] > 0 and report.scenes["S1"] > 0 and report.bytes_per_tile_year["S2"] > 0, text
            assert "S2 read    ok  11 assets" in text and "all checks passed" in text
    assert "credentials: Earthdata Login: token from EARTHDATA_TOKEN" in _check(sources["aws"])[1]
    assert "credentials: Planetary Computer: anonymous SAS tokens" in _check(sources["mpc"])[1]
    assert TOKEN not in caplog.text


def test_check_source_notes_a_block_outside_the_scenes_footprint(catalog):
    """The demo's scenes cover the BBOX at the tile's west edge (and 200 m around): the centre block
    of the whole tile, 3 km east, is outside every scene the search finds."""
    from tessera.sources.check import check_source

    out = io.StringIO()
    with open_source("demo", demo_catalog=catalog) as demo:
        check_source(demo, TILE, Window(0, 0, TILE.width, TILE.height), YEAR, file=out)
    text = out.getvalue()
    assert "note: the B04 block of" in text and "note: the vv block of" in text, text
    assert "holds no data (outside the scene's footprint)" in text


def _one_failure(report, text, *needles):
    assert not report.ok and len(report.failures) == 1, text
    line = report.failures[0]
    assert line.startswith("FAILED ") and "\n" not in line
    for needle in needles:
        assert needle in line, line
    return line


def test_check_source_names_each_failure_and_its_fix(services, origin, tmp_path, monkeypatch):
    _, cmr, published, asf = services
    aws = lambda: aws_source(published.earth_search_url, published.cmr_host)  # noqa: E731

    monkeypatch.setenv("EARTHDATA_TOKEN", "wrong-token-77")  # refused by the gateway
    report, text = _check(aws())
    _one_failure(report, text, "S1 read of vv", "did not accept the token from EARTHDATA_TOKEN", "Generate Token")
    assert "wrong-token-77" not in text

    for name in ("EARTHDATA_TOKEN", "EARTHDATA_USERNAME", "EARTHDATA_PASSWORD", "EARTHDATA_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    report, text = _check(aws())
    assert "credentials: Earthdata Login: none found" in text
    _one_failure(report, text, "S1 search", "needs Earthdata Login credentials", "EARTHDATA_TOKEN")
    monkeypatch.setenv("EARTHDATA_TOKEN", TOKEN)

    cmr.short_pages = 1
    import asf_search.constants.INTERNAL as internal

    monkeypatch.setattr(internal, "CMR_PAGE_SIZE", 2)
    try:
        report, text = _check(aws())
    finally:
        cmr.short_pages = 0
    _one_failure(report, text, "S1 search", "incompletely", "try again later")

    origin.sas_errors = 1000
    monkeypatch.setattr(mpc, "TOKEN_BACKOFF_BASE_S", 0.0)
    try:
        report, text = _check(mpc_source(published.mpc_url))
    finally:
        origin.sas_errors = 0
    assert not report.ok and all("token service" in line and "try again later" in line for line in report.failures)

    # An asset the catalogue lists but the host no longer has (404): named, with the fix.
    items = aws().s2.search(window_bbox_lonlat(TILE, WINDOW), DateRange.whole_year(YEAR))
    latest = max((i for i in items if i.properties["eo:cloud_cover"] < 100), key=lambda i: (i.datetime, i.id))
    path = latest.assets["red"].href[len(origin.url):]
    served = origin.files.pop(path)
    clear_gdal_http_cache()  # GDAL remembers the file from the reads above
    try:
        report, text = _check(aws())
    finally:
        origin.files[path] = served
    _one_failure(report, text, "S2 read of B04", "404", latest.id)
