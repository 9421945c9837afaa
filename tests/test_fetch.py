import dataclasses
import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.windows import Window

from conftest import STAC_FIXTURES, needs_shared
from tessera.errors import UserError
from tessera.fetch import encode_s1, encode_s2, fetch_s1, fetch_s2, valid_scl
from tessera.fetch.encode import has_s1_code
from tessera.grid import tile_at
from tessera.period import Period
from tessera.sources import Source
from tessera.sources.mpc import MPC_ASSET_KEYS, mpc_shaped_source
from tessera.sources.stac import StacFeed
from tessera.stack import open_s1, open_s2

TILE = tile_at(6.05, 52.05)  # UTM 32N, next to the zone 31 edge at 6°E
WINDOW = Window(100, 100, 40, 30)
H, W = 30, 40
S2_BANDS = ("B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12")


@dataclass(frozen=True)
class ListedFeed(StacFeed):
    """A feed whose search answers from a list of items instead of a STAC API."""

    listed: tuple = ()

    def search(self, bbox_lonlat, dates):
        return [item for item in self.listed if item.collection_id == self.collection
                and dates.start <= item.datetime <= dates.end]


def source(items, harmonisation="mpc"):
    s2, s1 = (ListedFeed("http://unused", collection, MPC_ASSET_KEYS, listed=tuple(items))
              for collection in ("sentinel-2-l2a", "sentinel-1-rtc"))
    return Source("test", s2, s1, harmonisation)


def write_raster(path, data, transform, crs=f"EPSG:{TILE.epsg}", nodata=None):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype,
                       crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=16, blockysize=16) as dst:
        dst.write(data, 1)
    return path


# Granules cover the window with a 10-pixel margin, on the tile's own 10 m grid unless said otherwise.
MARGIN = 10
GRANULE_TRANSFORM = TILE.window_transform(WINDOW) @ Affine.translation(-MARGIN, -MARGIN)


def window_field(values):
    """A (H, W) field placed inside a granule-sized array (edge value repeated in the margin)."""
    return np.pad(values, MARGIN, mode="edge")


def s2_item(tmp_path, item_id, when, reflectance, scl, *, crs=None, transform=None, scl_transform=None, cloud=10.0,
            scl_nodata=0):
    """An MPC-shaped S2 item; ``reflectance`` is one (h, w) field used for every band (band b gets + b)."""
    crs = crs or f"EPSG:{TILE.epsg}"
    transform = transform or GRANULE_TRANSFORM
    folder = tmp_path / item_id
    folder.mkdir()
    item = pystac.Item(item_id, None, None, when, {"eo:cloud_cover": cloud}, collection="sentinel-2-l2a")
    for offset, band in enumerate(S2_BANDS):
        path = write_raster(folder / f"{band}.tif", (reflectance + offset).astype(np.uint16), transform, crs, nodata=0)
        item.add_asset(band, pystac.Asset(str(path)))
    scl_path = write_raster(folder / "SCL.tif", scl.astype(np.uint8), scl_transform or transform, crs, nodata=scl_nodata)
    item.add_asset("SCL", pystac.Asset(str(scl_path)))
    return item


def s1_item(tmp_path, item_id, when, orbit, vv, vh, transform=GRANULE_TRANSFORM, mask=None, *, nodata=-32768,
            mask_transform=None):
    folder = tmp_path / item_id
    folder.mkdir()
    props = {"sat:orbit_state": orbit} if orbit else {}
    item = pystac.Item(item_id, None, None, when, props, collection="sentinel-1-rtc")
    for name, field in (("vv", vv), ("vh", vh)):
        path = write_raster(folder / f"{name}.tif", field.astype(np.float32), transform, nodata=nodata)
        item.add_asset(name, pystac.Asset(str(path)))
    if mask is not None:  # OPERA's layover/shadow layer: 0 = valid
        path = write_raster(folder / "mask.tif", mask.astype(np.uint8), mask_transform or transform)
        item.add_asset("mask", pystac.Asset(str(path)))
    return item


def opera_shaped_source(items):
    """A source whose S1 feed has OPERA's mask layer (as source aws)."""
    keys = {**MPC_ASSET_KEYS, "mask": "mask"}
    s2, s1 = (ListedFeed("http://unused", collection, keys, listed=tuple(items))
              for collection in ("sentinel-2-l2a", "sentinel-1-rtc"))
    return Source("test", s2, s1, "none")


def utc(*args):
    return dt.datetime(*args, tzinfo=dt.timezone.utc)


CLEAR = window_field(np.full((H, W), 4))
CONSTANT = window_field(np.full((H, W), 1500))


# --- encodings ---------------------------------------------------------------------------------


def test_s1_code_matches_hand_computed_values():
    gamma0 = np.array([0.1, 1.0, 0.0, -0.5, np.nan, np.inf, 1e-4, 1e9], dtype=np.float64)
    # 0.1: (20·(-1) + 50)·200 = 6000; 1.0: 10000; 1e-4: (-80 + 50)·200 < 0 -> 0; 1e9: 46000 -> 32767
    assert encode_s1(gamma0).tolist() == [6000, 10000, 0, 0, 0, 0, 0, 32767]
    assert encode_s1(gamma0).dtype == np.int16
    just_above = 10 ** ((6000.75 / 200 - 50) / 20)  # code 6000.75 truncates, not rounds
    assert encode_s1(np.array([just_above])).tolist() == [6000]


def l2a_item(when: dt.datetime, baseline: str | None = None) -> pystac.Item:
    properties = {} if baseline is None else {"s2:processing_baseline": baseline}
    return pystac.Item("S2A_test", None, None, when, properties)


def test_mpc_harmonisation_without_a_baseline_starts_after_2022_01_25_and_spares_values_below_1000():
    mpc, none = source([]), source([], harmonisation="none")
    values = np.array([999.0, 1000.0, 1500.0, 1500.9, np.nan])
    # 23:59 UTC on the 25th is still the 25th; 00:30 at UTC+2 on the 26th is the 25th in UTC.
    assert encode_s2(values, l2a_item(utc(2022, 1, 25, 23, 59)), mpc, ~np.isnan(values)).tolist() == [999, 1000, 1500, 1500, 0]
    plus_two = dt.datetime(2022, 1, 26, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert encode_s2(values, l2a_item(plus_two), mpc, ~np.isnan(values)).tolist() == [999, 1000, 1500, 1500, 0]
    assert encode_s2(values, l2a_item(utc(2022, 1, 26)), mpc, ~np.isnan(values)).tolist() == [999, 0, 500, 500, 0]
    assert encode_s2(values, l2a_item(utc(2024, 6, 1)), none, ~np.isnan(values)).tolist() == [999, 1000, 1500, 1500, 0]
    assert encode_s2(values, l2a_item(utc(2022, 1, 26)), mpc, ~np.isnan(values)).dtype == np.uint16


@pytest.mark.parametrize("harmonisation", ["mpc", "none"])
@pytest.mark.parametrize("when", [utc(2021, 6, 1), utc(2024, 6, 1)])
def test_s2_dn_encode_in_integers_exactly_as_in_float64(harmonisation, when):
    """uint16 DN (what L2A COGs hold) are harmonised in integers: the same codes as the float64 path
    the reference takes, for every DN, with no data (``valid`` False, or NaN in floats) as 0."""
    dn = np.arange(65536, dtype=np.uint16)
    valid = np.random.default_rng(0).random(dn.size) > 0.1
    item, chosen = l2a_item(when), source([], harmonisation=harmonisation)
    as_floats = np.where(valid, dn.astype(np.float64), np.nan)
    expected = encode_s2(as_floats, item, chosen, ~np.isnan(as_floats))
    assert np.array_equal(encode_s2(dn, item, chosen, valid), expected)
    assert np.array_equal(encode_s2(dn.astype(np.float32), item, chosen, valid), expected)
    assert encode_s2(dn, item, chosen, valid).dtype == np.uint16
    assert (expected[~valid] == 0).all() and (expected[valid] != dn[valid]).any() == (harmonisation == "mpc" and when.year > 2022)


@needs_shared
@pytest.mark.parametrize("fixture, offset", [
    ("mpc-sentinel-2-l2a-item-2019-06-29-baseline-02.12.json", False),
    ("mpc-sentinel-2-l2a-item-2022-06-12-baseline-04.00.json", True),
    ("mpc-sentinel-2-l2a-item-2025-03-12-baseline-05.11.json", True),
])
def test_mpc_harmonisation_of_real_items_follows_their_processing_baseline(fixture, offset):
    item = pystac.Item.from_dict(json.loads((STAC_FIXTURES / fixture).read_text()))
    values = np.array([999.0, 1500.0])
    assert encode_s2(values, item, source([]), ~np.isnan(values)).tolist() == ([999, 500] if offset else [999, 1500])


def test_mpc_harmonisation_trusts_a_stated_baseline_over_the_date():
    """The date rule only stands for the baseline: 04.00 products of 2022-01-25 carry the offset,
    an older date reprocessed under 05.00 does too, and an unreadable baseline falls back to the date."""
    mpc, values = source([]), np.array([1500.0])
    assert encode_s2(values, l2a_item(utc(2022, 1, 25, 10), "04.00"), mpc, ~np.isnan(values)).tolist() == [500]
    assert encode_s2(values, l2a_item(utc(2019, 6, 29, 10), "05.00"), mpc, ~np.isnan(values)).tolist() == [500]
    assert encode_s2(values, l2a_item(utc(2023, 6, 29, 10), "03.01"), mpc, ~np.isnan(values)).tolist() == [1500]
    assert encode_s2(values, l2a_item(utc(2023, 6, 29, 10), "N/A"), mpc, ~np.isnan(values)).tolist() == [500]


def test_scl_classes():
    assert [int(c) for c in np.arange(12) if valid_scl(np.array([c]))[0]] == [4, 5, 6, 7, 10, 11]
    # A float SCL's NaN is no data, as the reference's fill 0; other numbers it does not list are usable.
    assert valid_scl(np.array([np.nan, 0.0, 4.0, 12.0])).tolist() == [False, False, True, True]


# --- Sentinel-2 --------------------------------------------------------------------------------


def test_an_s1_pixel_has_a_code_where_vv_or_vh_is_non_zero():
    sar = np.array([[[0, 0], [5, 0]], [[0, -3], [7, 9]]], np.int16)
    np.testing.assert_array_equal(has_s1_code(sar), [[False, True], [True, True]])


def test_s2_single_granule_encoding_mask_and_time_axis(tmp_path):
    scl = np.full((H, W), 4)
    scl[:, :10] = 9  # cloud high
    scl[:5, :] = 3  # cloud shadow
    item = s2_item(tmp_path, "A", utc(2024, 2, 10, 10, 30), CONSTANT, window_field(scl))
    report = fetch_s2(TILE, WINDOW, 2024, source([item]), tmp_path / "s2.zarr")
    stack = open_s2(tmp_path / "s2.zarr")
    assert stack.series.dates == ("2024-02-10",) and stack.series.doys.tolist() == [41]
    assert stack.series.scenes == (("A",),)
    # MPC rule after 2022-01-25: 1500 + b -> 500 + b; band order is the reference's.
    np.testing.assert_array_equal(stack.bands[0, 10, 20], [500 + S2_BANDS.index(b) for b in S2_BANDS])
    np.testing.assert_array_equal(stack.masks[0], (scl == 4).astype(np.uint8))
    # Invalid pixels keep the granule's values (as the reference's single-granule days).
    assert stack.bands[0, 0, 0, 0] == 500
    assert stack.grid.transform == TILE.window_transform(WINDOW)
    assert report["kept"] == ["2024-02-10"] and report["skipped"] == {} and report["bytes"] > 0


def test_same_day_granules_merge_by_first_valid_in_datetime_order(tmp_path):
    early_scl = np.full((H, W), 4)
    early_scl[:, :20] = 8  # cloudy in the left half
    late_scl = np.full((H, W), 5)
    late_scl[:10, :] = 0  # no data in the top rows
    early = s2_item(tmp_path, "early", utc(2024, 5, 1, 10, 0), window_field(np.full((H, W), 100)), window_field(early_scl))
    late = s2_item(tmp_path, "late", utc(2024, 5, 1, 10, 5), window_field(np.full((H, W), 200)), window_field(late_scl))
    fetch_s2(TILE, WINDOW, 2024, source([late, early]), tmp_path / "s2.zarr")
    stack = open_s2(tmp_path / "s2.zarr")
    assert stack.series.scenes == (("early", "late"),)
    red = stack.bands[0, :, :, 0]
    assert (red[:, 20:] == 100).all()  # early is valid there and comes first
    assert (red[10:, :20] == 200).all()  # early cloudy, late valid
    assert (red[:10, :20] == 100).all()  # neither valid: first granule's values, mask 0
    expected_mask = np.ones((H, W), np.uint8)
    expected_mask[:10, :20] = 0
    np.testing.assert_array_equal(stack.masks[0], expected_mask)


def test_granule_from_another_utm_zone_lands_where_it_should(tmp_path):
    # A zone 31 granule whose value is a linear function of its own easting/northing.
    to31 = Transformer.from_crs(TILE.epsg, 32631, always_xy=True)
    west, north = TILE.window_transform(WINDOW) @ (0, 0)
    x31, y31 = to31.transform(west, north)
    origin = (np.floor(x31 / 10) * 10 - 500, np.floor(y31 / 10) * 10 + 500)
    size = 150
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    x_centre, y_centre = origin[0] + (cols + 0.5) * 10, origin[1] - (rows + 0.5) * 10

    def field(x, y):
        return 3000 + 2.0 * (x - origin[0]) - 1.5 * (origin[1] - y)

    item = s2_item(tmp_path, "z31", utc(2024, 7, 1, 10), field(x_centre, y_centre), np.full((size, size), 4),
                   crs="EPSG:32631", transform=Affine(10, 0, origin[0], 0, -10, origin[1]))
    fetch_s2(TILE, WINDOW, 2024, source([item], harmonisation="none"), tmp_path / "s2.zarr", resampling="bilinear")
    red = open_s2(tmp_path / "s2.zarr").bands[0, :, :, 0].astype(float)
    transform = TILE.window_transform(WINDOW)
    cc, rr = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    xs, ys = transform @ (cc, rr)
    expected = field(*to31.transform(xs, ys))
    # Bilinear on a linear field is exact, up to GDAL's approximate transformer (error <= 1/8 pixel,
    # WarpedVRT's default tolerance) and rounding to the source's integers. One pixel off would be 25.
    gradient_per_pixel = np.hypot(2.0 * 10, 1.5 * 10)
    assert np.abs(red - expected).max() <= 0.125 * gradient_per_pixel + 1
    assert open_s2(tmp_path / "s2.zarr").masks[0].all()


def test_dates_below_min_coverage_are_skipped(tmp_path):
    scl = np.full((H, W), 9)
    scl[0, 0] = 4  # one valid pixel of 1200: 0.083 %
    item = s2_item(tmp_path, "A", utc(2024, 3, 1, 10), CONSTANT, window_field(scl))
    clear = s2_item(tmp_path, "B", utc(2024, 3, 2, 10), CONSTANT, CLEAR)
    report = fetch_s2(TILE, WINDOW, 2024, source([item, clear]), tmp_path / "low.zarr", min_coverage_pct=0.01)
    assert report["kept"] == ["2024-03-01", "2024-03-02"]
    report = fetch_s2(TILE, WINDOW, 2024, source([item, clear]), tmp_path / "high.zarr", min_coverage_pct=0.1)
    assert report["kept"] == ["2024-03-02"] and report["low_coverage"] == ["2024-03-01"]
    # Coverage counts ROI pixels only: an ROI of just that pixel makes the date 100 % covered...
    roi = np.zeros((H, W), bool)
    roi[0, 0] = True
    report = fetch_s2(TILE, WINDOW, 2024, source([item]), tmp_path / "roi.zarr", roi_mask=roi, min_coverage_pct=50)
    assert report["kept"] == ["2024-03-01"]
    # ... and an ROI that the valid pixel misses makes it 0 %: no usable date, the tile fails.
    with pytest.raises(UserError, match="grid_6.05_52.05: 0 usable Sentinel-2 dates"):
        fetch_s2(TILE, WINDOW, 2024, source([item]), tmp_path / "none.zarr", roi_mask=~roi, min_coverage_pct=0)
    assert not (tmp_path / "none.zarr").exists()


def test_unreadable_scene_is_recorded_and_skipped(tmp_path):
    broken = s2_item(tmp_path, "broken", utc(2024, 4, 1, 10, 0), CONSTANT, CLEAR)
    twin = s2_item(tmp_path, "twin", utc(2024, 4, 1, 10, 5), window_field(np.full((H, W), 700)), CLEAR)
    good = s2_item(tmp_path, "good", utc(2024, 4, 11, 10), CONSTANT, CLEAR)
    b04 = tmp_path / "broken" / "B04.tif"
    b04.write_bytes(b04.read_bytes()[:600])  # truncated: header readable, tiles not
    report = fetch_s2(TILE, WINDOW, 2024, source([broken, twin, good]), tmp_path / "s2.zarr")
    stack = open_s2(tmp_path / "s2.zarr")
    assert list(stack.skipped) == ["broken"] and "B04" in stack.skipped["broken"]
    assert report["skipped"] == stack.skipped
    # The day of the broken granule is rebuilt from its twin alone.
    assert stack.series.scenes == (("twin",), ("good",))
    assert (stack.bands[0, :, :, 0] == 700).all()


def test_a_tile_that_lost_more_than_max_skipped_pct_of_its_scenes_fails(tmp_path, monkeypatch):
    import tessera.fetch.reader as reader

    monkeypatch.setattr(reader, "TRANSIENT_BACKOFF_S", 0.0)
    broken = s2_item(tmp_path, "broken", utc(2024, 4, 1, 10, 0), CONSTANT, CLEAR)
    good = s2_item(tmp_path, "good", utc(2024, 4, 11, 10), CONSTANT, CLEAR)
    (tmp_path / "broken" / "B04.tif").write_bytes((tmp_path / "broken" / "B04.tif").read_bytes()[:600])
    with pytest.raises(UserError, match=r"1 of 2 Sentinel-2 scenes were skipped, more than fetch.max_skipped_pct=10%.*broken"):
        fetch_s2(TILE, WINDOW, 2024, source([broken, good]), tmp_path / "s2.zarr", max_skipped_pct=10)
    assert not (tmp_path / "s2.zarr").exists()
    report = fetch_s2(TILE, WINDOW, 2024, source([broken, good]), tmp_path / "s2.zarr", max_skipped_pct=50)
    assert list(report["skipped"]) == ["broken"]


def test_too_few_usable_dates_fail_the_tile_naming_the_failed_scenes(tmp_path):
    broken = s2_item(tmp_path, "S2A_broken", utc(2024, 4, 1, 10), CONSTANT, CLEAR)
    (tmp_path / "S2A_broken" / "SCL.tif").write_bytes(b"not a tiff")
    good = s2_item(tmp_path, "good", utc(2024, 4, 11, 10), CONSTANT, CLEAR)
    with pytest.raises(UserError, match=r"tile grid_6.05_52.05: 1 usable Sentinel-2 dates.*min_scenes=2.*S2A_broken: SCL"):
        fetch_s2(TILE, WINDOW, 2024, source([broken, good]), tmp_path / "s2.zarr", min_scenes=2)
    assert not (tmp_path / "s2.zarr").exists()


def test_fully_cloudy_scenes_are_not_used_as_the_reference_searches_cloud_cover_below_100(tmp_path):
    cloudy = s2_item(tmp_path, "cloudy", utc(2024, 4, 1, 10), CONSTANT, CLEAR, cloud=100.0)
    good = s2_item(tmp_path, "good", utc(2024, 4, 11, 10), CONSTANT, CLEAR, cloud=99.9)
    report = fetch_s2(TILE, WINDOW, 2024, source([cloudy, good]), tmp_path / "s2.zarr")
    assert report["kept"] == ["2024-04-11"] and report["excluded_full_cloud"] == 1


# --- Sentinel-1 --------------------------------------------------------------------------------


def test_s1_merges_first_non_zero_per_date_and_orbit_and_honours_nodata(tmp_path):
    first_vv = np.full((H, W), 0.1)
    first_vv[:, :20] = -32768  # nodata in the left half
    # Half a pixel off our grid, so that bilinear mixes neighbours: across the nodata edge it must not.
    half_pixel_off = GRANULE_TRANSFORM @ Affine.translation(0.5, 0.5)
    first = s1_item(tmp_path, "first", utc(2024, 6, 3, 5, 0), "ascending", window_field(first_vv),
                    window_field(np.full((H, W), 0.01)), transform=half_pixel_off)
    second = s1_item(tmp_path, "second", utc(2024, 6, 3, 5, 1), "ascending",
                     window_field(np.full((H, W), 1.0)), window_field(np.full((H, W), 1.0)))
    evening = s1_item(tmp_path, "evening", utc(2024, 6, 3, 17), "descending",
                      window_field(np.full((H, W), 1.0)), window_field(np.full((H, W), 0.1)))
    no_orbit = s1_item(tmp_path, "no_orbit", utc(2024, 6, 4, 5), None,
                       window_field(np.full((H, W), 1.0)), window_field(np.full((H, W), 1.0)))
    report = fetch_s1(TILE, WINDOW, 2024, source([second, evening, first, no_orbit]), tmp_path / "s1.zarr")
    stack = open_s1(tmp_path / "s1.zarr")
    assert stack.ascending.dates == ("2024-06-03",) and stack.ascending.scenes == (("first", "second"),)
    assert stack.descending.scenes == (("evening",),) and stack.descending.doys.tolist() == [155]
    sar = stack.ascending.arrays["sar"][0]
    # Right half from "first" (γ0 0.1 -> 6000, right up to the nodata edge: nodata is not blended in),
    # left half from "second" (γ0 1 -> 10000). VH everywhere from "first": float32(0.01) is just
    # below 0.01, so its code 1999.99... truncates to 1999.
    assert (sar[:, 20:, 0] == 6000).all() and (sar[:, :20, 0] == 10000).all()
    assert (sar[:, :, 1] == 1999).all()
    assert (stack.descending.arrays["sar"][0] == [10000, 6000]).all()
    assert "no_orbit" in stack.skipped and "no_orbit" in report["skipped"]
    assert report["kept"] == ["2024-06-03 ascending", "2024-06-03 descending"]


def test_s1_resampling_defaults_to_the_references_for_the_source(tmp_path):
    # gamma0 rising by 0.01 per pixel eastwards, on a grid a quarter pixel east of ours.
    ramp = window_field(np.tile(0.05 + 0.01 * np.arange(W), (H, 1)))
    item = s1_item(tmp_path, "A", utc(2024, 6, 3, 5), "descending", ramp, ramp,
                   transform=GRANULE_TRANSFORM @ Affine.translation(0.25, 0))
    columns = np.arange(5, 15)
    # Nearest takes each pixel's own source pixel, bilinear a quarter of the way to the western one.
    expected = {"nearest": 0.05 + 0.01 * columns, "bilinear": 0.0475 + 0.01 * columns}
    for rule, values in expected.items():
        mpc_like = dataclasses.replace(source([item]), s1_resampling=rule)
        fetch_s1(TILE, WINDOW, 2024, mpc_like, tmp_path / f"{rule}.zarr")
        sar = open_s1(tmp_path / f"{rule}.zarr").descending.arrays["sar"][0, 5, columns, 0]
        # Within a tenth of a pixel (GDAL's approximate transformer); the two rules differ by a quarter.
        np.testing.assert_allclose(10 ** ((sar / 200 - 50) / 20), values, atol=1e-3)
    assert mpc_shaped_source("demo", "http://unused").s1_resampling == "nearest"


def test_s1_polarisation_below_min_coverage_is_dropped(tmp_path):
    vh = np.full((H, W), np.float32(-32768))
    vh[0, 0] = 0.1  # 1 pixel of 1200
    item = s1_item(tmp_path, "A", utc(2024, 6, 3, 5), "descending", window_field(np.full((H, W), 0.1)), window_field(vh))
    fetch_s1(TILE, WINDOW, 2024, source([item]), tmp_path / "s1.zarr", min_coverage_pct=0.1, resampling="nearest")
    sar = open_s1(tmp_path / "s1.zarr").descending.arrays["sar"][0]
    assert (sar[..., 0] == 6000).all() and not sar[..., 1].any()


# --- integration: the demo source's real STAC API and COGs over HTTP --------------------------


def test_demo_source_end_to_end_and_rerun_from_the_search_cache(tmp_path, monkeypatch):
    from shapely import box

    from tessera.demo import generate_catalog
    from tessera.grid import roi_in_tile, tiles_for_geometry, work_window
    from tessera.sources import open_source
    from tessera.stack import verify_stack_index, write_stack_index

    bbox = (5.998, 52.040, 6.002, 52.042)  # across 6°E: granules in UTM zones 31 and 32
    catalog = generate_catalog(tmp_path / "catalog", 2024, bbox, seed=3, s2_revisit_days=60, s1_revisit_days=90)
    tile = next(tile for tile, _ in tiles_for_geometry(box(*bbox)) if tile.epsg == 32632)
    window = work_window(tile, roi_in_tile(tile, box(*bbox)))
    work = tmp_path / tile.name
    with open_source("demo", demo_catalog=catalog) as demo:
        s2 = fetch_s2(tile, window, 2024, demo, work / "s2.zarr", search_cache=work / "search_s2.json", patch_size=16)
        s1 = fetch_s1(tile, window, 2024, demo, work / "s1.zarr", search_cache=work / "search_s1.json", patch_size=16)
    assert s2["kept"] and s2["skipped"] == {} and s1["skipped"] == {}
    stack = open_s2(work / "s2.zarr")
    scenes = {scene for step in stack.series.scenes for scene in step}
    assert any("_T31" in scene for scene in scenes) and any("_T32" in scene for scene in scenes)
    masks = stack.masks[:]
    assert 0 < masks.mean() < 1  # clouds are masked, clear land is not
    assert (np.median(stack.bands[:][masks == 1], axis=0) > 0).all()
    radar = open_s1(work / "s1.zarr")
    assert len(radar.ascending) and len(radar.descending)
    # S1 validity is "VV or VH non-zero"; very dark VH (below -25 dB) is coded 0 like missing data.
    assert (radar.ascending.arrays["sar"][:] != 0).any(axis=-1).mean() > 0.9
    write_stack_index(work / "s2.zarr", work / "s1.zarr", work / "stack.json")
    assert verify_stack_index(work / "stack.json").index["s2"]["dates"] == s2["kept"]

    # A rerun searches no more: the cached items' hrefs move to the new server's port.
    def no_search(*args):
        raise AssertionError("searched again")

    monkeypatch.setattr(StacFeed, "search", no_search)
    with open_source("demo", demo_catalog=catalog) as demo:
        again = fetch_s2(tile, window, 2024, demo, work / "s2.zarr", search_cache=work / "search_s2.json", patch_size=16)
    assert again["kept"] == s2["kept"]
    np.testing.assert_array_equal(open_s2(work / "s2.zarr").bands[:], stack.bands[:])


# --- what each checkpoint saw (issue 13) ---------------------------------------------------------


def test_same_datetime_granules_keep_the_search_order_as_the_reference_stable_sort(tmp_path):
    # Planetary Computer (pgstac) and Earth Search return one datatake's granules id-descending;
    # the reference's stackstac sorts by datetime only (stably), so the first one returned wins.
    when = utc(2024, 5, 1, 10, 30)
    newer = s2_item(tmp_path, "S2A_MSIL2A_20240501_R008_T32ULC_20240501T150000", when,
                    window_field(np.full((H, W), 300)), CLEAR)
    older = s2_item(tmp_path, "S2A_MSIL2A_20240501_R008_T32ULC_20240501T120000", when,
                    window_field(np.full((H, W), 100)), CLEAR)
    cache = tmp_path / "search_s2.json"
    for run in ("searched", "from the cache"):
        fetch_s2(TILE, WINDOW, 2024, source([newer, older]), tmp_path / f"{run}.zarr", search_cache=cache)
        stack = open_s2(tmp_path / f"{run}.zarr")
        assert stack.series.scenes == ((newer.id, older.id),), run
        assert (stack.bands[0, :, :, 0] == 300).all(), run
        assert stack.grid.preprocessing.granule_order == "datetime, then search order"
    # An earlier datetime still comes first, whatever the search order.
    early = s2_item(tmp_path, "S2A_early", utc(2024, 5, 1, 10, 29), window_field(np.full((H, W), 700)), CLEAR)
    fetch_s2(TILE, WINDOW, 2024, source([newer, older, early]), tmp_path / "three.zarr")
    assert open_s2(tmp_path / "three.zarr").series.scenes == ((early.id, newer.id, older.id),)


def test_stacks_record_the_preprocessing_choices(tmp_path):
    item = s2_item(tmp_path, "A", utc(2024, 2, 10, 10, 30), CONSTANT, CLEAR)
    fetch_s2(TILE, WINDOW, 2024, source([item]), tmp_path / "s2.zarr", resampling="nearest")
    grid = open_s2(tmp_path / "s2.zarr").grid
    assert grid.preprocessing.attrs() == {"s2_resampling": "nearest", "harmonisation": "mpc", "s1_layover": "kept",
                                          "granule_order": "datetime, then search order", "period": "01-01/12-31",
                                          "s1_orbit_state": "both"}
    radar = s1_item(tmp_path, "R", utc(2024, 2, 11, 5), "ascending", window_field(np.full((H, W), 0.1)),
                    window_field(np.full((H, W), 0.01)))
    fetch_s1(TILE, WINDOW, 2024, source([radar], harmonisation="none"), tmp_path / "s1.zarr",
             s2_resampling="bilinear", mask_layover=True, period=Period.parse("02-01/03-31"),
             s1_orbit_state="ascending")
    assert open_s1(tmp_path / "s1.zarr").grid.preprocessing.attrs() == {
        "s2_resampling": "bilinear", "harmonisation": "none", "s1_layover": "masked",
        "granule_order": "datetime, then search order", "period": "02-01/03-31", "s1_orbit_state": "ascending"}


def test_a_period_keeps_only_its_dates_and_names_them_when_too_few(tmp_path):
    """config period: the search covers the month-days of the year, both days included (UTC)."""
    items = [s2_item(tmp_path, f"S2A_{month}_{day}", utc(2024, month, day, hour), CONSTANT, CLEAR)
             for month, day, hour in ((3, 31, 23), (4, 1, 0), (6, 30, 23), (7, 1, 0))]
    period = Period.parse("04-01/06-30")
    fetch_s2(TILE, WINDOW, 2024, source(items), tmp_path / "s2.zarr", period=period)
    stack = open_s2(tmp_path / "s2.zarr")
    assert stack.series.dates == ("2024-04-01", "2024-06-30")
    assert stack.grid.preprocessing.period == "04-01/06-30"
    with pytest.raises(UserError, match=r"0 usable Sentinel-2 dates in 2024-08-01\.\.2024-08-31, fewer than .*"
                                        r"\(no scene found\): widen config period, or lower fetch.min_scenes$"):
        fetch_s2(TILE, WINDOW, 2024, source(items), tmp_path / "none.zarr", period=Period.parse("08-01/08-31"))


def test_an_orbit_filter_leaves_the_other_directions_series_empty(tmp_path):
    """fetch.s1_orbit_state: the other direction's scenes are left out, not skipped, as the
    reference's S1_ORBIT_STATE query leaves them out (its stacker then writes an empty series)."""
    vv, vh = window_field(np.full((H, W), 0.1)), window_field(np.full((H, W), 0.01))
    radar = [s1_item(tmp_path, "up", utc(2024, 5, 1, 17), "ascending", vv, vh),
             s1_item(tmp_path, "down", utc(2024, 5, 2, 5), "descending", vv, vh),
             s1_item(tmp_path, "down2", utc(2024, 5, 14, 5), "descending", vv, vh)]
    report = fetch_s1(TILE, WINDOW, 2024, source(radar), tmp_path / "s1.zarr", s1_orbit_state="descending")
    stack = open_s1(tmp_path / "s1.zarr")
    assert len(stack.ascending) == 0 and stack.ascending.arrays["sar"].shape == (0, H, W, 2)
    assert stack.descending.dates == ("2024-05-02", "2024-05-14")
    assert report["excluded_other_orbit"] == 1 and report["skipped"] == {}
    assert stack.grid.preprocessing.s1_orbit_state == "descending"
    both = fetch_s1(TILE, WINDOW, 2024, source(radar), tmp_path / "both.zarr")
    assert len(open_s1(tmp_path / "both.zarr").ascending) == 1 and both["excluded_other_orbit"] == 0
    with pytest.raises(UserError, match="fetch.s1_orbit_state left out all 1 scenes found"):
        fetch_s1(TILE, WINDOW, 2024, source(radar[:1]), tmp_path / "none.zarr", s1_orbit_state="descending")
    assert not (tmp_path / "none.zarr").exists()


# float32(0.86496764): 20·log10 in float32 gives code 9748, in float64 9747 (the reference reads
# OPERA's bursts with rasterio, float32; MPC's RTC with stackstac, float64).
GAMMA0_CODES_DIFFER = 0.8649676442146301


def test_opera_layover_pixels_are_kept_by_default_and_encoded_in_float32(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[:, :15] = 1  # layover in the west of the window
    vv = window_field(np.full((H, W), GAMMA0_CODES_DIFFER))
    radar = s1_item(tmp_path, "burst", utc(2024, 6, 3, 5), "ascending", vv, vv / 10, mask=window_field(mask))
    fetch_s1(TILE, WINDOW, 2024, opera_shaped_source([radar]), tmp_path / "kept.zarr")
    kept = open_s1(tmp_path / "kept.zarr").ascending.arrays["sar"][0, :, :, 0]
    assert (kept == 9748).all()  # everywhere, the layover too; float32 arithmetic
    fetch_s1(TILE, WINDOW, 2024, opera_shaped_source([radar]), tmp_path / "masked.zarr", mask_layover=True)
    masked = open_s1(tmp_path / "masked.zarr").ascending.arrays["sar"][0, :, :, 0]
    assert (masked[:, :15] == 0).all() and (masked[:, 15:] == 9748).all()
    # A feed without the mask layer (MPC's RTC) is encoded in float64, as stackstac reads it.
    mpc_radar = s1_item(tmp_path, "mpc", utc(2024, 6, 3, 5), "ascending", vv, vv / 10)
    fetch_s1(TILE, WINDOW, 2024, source([mpc_radar]), tmp_path / "mpc.zarr")
    assert (open_s1(tmp_path / "mpc.zarr").ascending.arrays["sar"][0, :, :, 0] == 9747).all()


def test_a_positive_s1_nodata_value_is_no_data_not_a_backscatter(tmp_path):
    vv = np.full((H, W), 0.1)
    vv[:, :10] = 5.0  # the feed's nodata value: 5.0 as a γ0 would encode to 12795
    radar = s1_item(tmp_path, "burst", utc(2024, 6, 3, 5), "ascending", window_field(vv),
                    window_field(np.full((H, W), 0.01)), nodata=5.0)
    fetch_s1(TILE, WINDOW, 2024, source([radar]), tmp_path / "s1.zarr")
    vv_codes = open_s1(tmp_path / "s1.zarr").ascending.arrays["sar"][0, :, :, 0]
    assert (vv_codes[:, :10] == 0).all() and (vv_codes[:, 10:] == 6000).all()


def test_a_mask_layer_smaller_than_the_burst_masks_what_it_does_not_cover(tmp_path):
    """OPERA's mask layer has no nodata value: outside its footprint (an alpha band says so) the
    pixels count as masked, as before they were NaN, and NaN != 0."""
    vv = window_field(np.full((H, W), 0.1))
    mask = np.zeros((H + 2 * MARGIN, W + 2 * MARGIN - 25), np.uint8)  # covers the window from column 15 on
    east = GRANULE_TRANSFORM @ Affine.translation(25, 0)
    radar = s1_item(tmp_path, "burst", utc(2024, 6, 3, 5), "ascending", vv, vv / 10, mask=mask, mask_transform=east)
    fetch_s1(TILE, WINDOW, 2024, opera_shaped_source([radar]), tmp_path / "s1.zarr", mask_layover=True)
    vv_codes = open_s1(tmp_path / "s1.zarr").ascending.arrays["sar"][0, :, :, 0]
    assert (vv_codes[:, :15] == 0).all() and (vv_codes[:, 15:] == 6000).all()


def test_an_scl_nodata_value_that_is_not_zero_is_no_data(tmp_path):
    scl = np.full((H, W), 4)
    scl[:, :10] = 255  # the granule's nodata: not an SCL class the reference rejects by number
    item = s2_item(tmp_path, "A", utc(2024, 2, 10, 10, 30), CONSTANT, window_field(scl), scl_nodata=255)
    fetch_s2(TILE, WINDOW, 2024, source([item]), tmp_path / "s2.zarr")
    masks = open_s2(tmp_path / "s2.zarr").masks[0]
    assert (masks[:, :10] == 0).all() and (masks[:, 10:] == 1).all()


def test_verify_lists_the_scenes_each_tiles_fetch_skipped(tmp_path, monkeypatch, capsys):
    """Issue 12 (e): skipped scenes are in stack.json and in `tessera verify --work-dir`'s output."""
    import json
    from types import SimpleNamespace

    import tessera.publish.verify as verify
    from tessera.cli import main
    from tessera.grid import Tile
    from tessera.layout import WorkTile

    tile = Tile.from_name("grid_6.05_52.05")
    work = WorkTile.at(tmp_path / "work", 2024, tile.name)
    work.root.mkdir(parents=True)
    work.stack_index.write_text(json.dumps({"s2": {"skipped": {"S2A_X": "B04: HTTP response code: 404"}},
                                            "s1": {"skipped": {}}}))
    monkeypatch.setattr(verify, "find_tiles", lambda results: [SimpleNamespace(year=2024, tile=tile)])
    monkeypatch.setattr(verify, "verify_output", lambda output_dir: [])
    assert main(["verify", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert f"note: 2024/{tile.name}: 1 S2 scene(s) skipped (S2A_X: B04: HTTP response code: 404)" in printed


def test_search_results_keep_the_servers_order_through_deduplication():
    """pgstac and stac-server return one datatake's granules id-descending: dropping repeats (a
    server paging over a moving result set) must not reorder them, or same-datetime merging would
    follow another order than the reference's."""
    from tessera.sources.stac import _matching

    when = utc(2024, 5, 1, 10, 30)
    ids = ["S2B_T32ULC_20240501T150000", "S2B_T32ULC_20240501T120000", "S2A_T32ULC_20240501T130000"]
    items = [pystac.Item(item_id, None, None, when, {}, collection="sentinel-2-l2a") for item_id in ids]
    kept = _matching([*items, items[0]], "sentinel-2-l2a", (5.0, 52.0, 7.0, 53.0), utc(2024, 1, 1), utc(2024, 12, 31))
    assert [item.id for item in kept] == ids


@pytest.mark.parametrize("dtype, nodata, columns", [
    ("uint16", 0, (0, 0)),  # S2 reflectance and SCL
    # MPC RTC. Valid neighbours either side of the nodata value: their average comes closer to it
    # than GDAL's float tolerance (ARE_REAL_EQUAL) without equalling it, and counts as nodata.
    ("float32", -32768.0, (-32767.98, -32768.03)),
    ("float32", float("nan"), (np.nan, np.nan)),  # OPERA
    ("uint8", None, (0, 0)),  # OPERA's mask layer: an alpha band marks what lies outside the scene
])
@pytest.mark.parametrize("resampling", [Resampling.bilinear, Resampling.nearest])
def test_one_warp_reads_the_values_and_validity_rasterios_masked_read_gives(tmp_path, dtype, nodata, columns, resampling):
    from rasterio.vrt import WarpedVRT

    from tessera.fetch.reader import WindowReader

    rng = np.random.default_rng(0)
    data = rng.uniform(1, 200, (H + 2 * MARGIN, W + 2 * MARGIN)).astype(dtype)
    data[5:15, 8:20:2], data[5:15, 9:20:2] = columns
    # Half a pixel off the window's grid and only partly over it: pixels outside the scene, kernels across nodata.
    shifted = GRANULE_TRANSFORM @ Affine.translation(0.5 + 25, 0.5)
    path = write_raster(tmp_path / "band.tif", data, shifted, nodata=nodata)
    reader = WindowReader(TILE, WINDOW, source([]).s2, parallel_reads=1)
    with rasterio.open(path) as src, WarpedVRT(src, crs=reader.crs, transform=reader.transform, width=reader.width,
                                               height=reader.height, resampling=resampling,
                                               add_alpha=src.nodata is None) as vrt:
        expected = vrt.read(1, masked=True).astype(np.float64).filled(np.nan)
    values, valid = reader._warped(str(path), resampling, cached=True)
    got = np.where(valid, values.astype(np.float64), np.nan)
    assert values.dtype == np.dtype(dtype)
    assert np.isnan(expected).any() and np.isfinite(expected).any()
    np.testing.assert_array_equal(got, expected)
