import json

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from shapely import box

from tessera.errors import UserError
from tessera.grid import reproject, tile_at
from tessera.roi import rasterize_roi, read_roi, read_roi_mask, write_roi_mask

ROI_LONLAT = box(6.01, 52.02, 6.03, 52.03)


def _utm(geometry, epsg=32632):
    return reproject(geometry, 4326, epsg, densify=0.001)


def _write_vector(path, geometries, crs, driver):
    wkb = np.array([shapely.to_wkb(g) for g in geometries], dtype=object)
    pyogrio.raw.write(path, wkb, field_data=[], fields=[], crs=crs, geometry_type="Polygon", driver=driver)


def test_bbox_string():
    assert read_roi("6.01,52.02,6.03,52.03").equals(ROI_LONLAT)
    assert read_roi(" 6.01, 52.02 ,6.03,52.03").equals(ROI_LONLAT)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("6.03,52.02,6.01,52.03", "reversed"),
        ("6.01,52.03,6.03,52.02", "reversed"),
        ("190,52.02,191,52.03", "out of range"),
        ("6.01,-95,6.03,52.03", "out of range"),
        ("no/such/roi.geojson", "does not exist"),
    ],
)
def test_bad_roi_specs(spec, message):
    with pytest.raises(UserError, match=message):
        read_roi(spec)


def test_geojson_without_crs_is_wgs84(tmp_path):
    path = tmp_path / "roi.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(ROI_LONLAT)}]}))
    assert read_roi(path).equals_exact(ROI_LONLAT, 1e-12)


@pytest.mark.parametrize("driver, name", [("GPKG", "roi.gpkg"), ("ESRI Shapefile", "roi.shp")])
def test_projected_vector_files_come_back_in_lonlat(tmp_path, driver, name):
    path = tmp_path / name
    halves = [box(6.01, 52.02, 6.02, 52.03), box(6.02, 52.02, 6.03, 52.03)]
    _write_vector(path, [_utm(h) for h in halves], "EPSG:32632", driver)
    roi = read_roi(path)
    assert roi.geom_type == "Polygon"  # the two features are dissolved into one
    assert roi.symmetric_difference(ROI_LONLAT).area < 1e-3 * ROI_LONLAT.area


def test_shapefile_without_prj_is_refused(tmp_path):
    path = tmp_path / "roi.shp"
    _write_vector(path, [ROI_LONLAT], "EPSG:4326", "ESRI Shapefile")
    (tmp_path / "roi.prj").unlink()
    with pytest.raises(UserError, match="no CRS"):
        read_roi(path)


def test_points_only_has_no_area(tmp_path):
    path = tmp_path / "points.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [6.0, 52.0]}}]}))
    with pytest.raises(UserError, match="no area"):
        read_roi(path)


def test_not_a_vector_file(tmp_path):
    path = tmp_path / "roi.geojson"
    path.write_text("this is not json")
    with pytest.raises(UserError, match="cannot be read"):
        read_roi(path)


def _write_mask(path, mask, transform, crs="EPSG:32632"):
    with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1,
                       dtype="uint8", crs=crs, transform=transform) as dst:
        dst.write(mask, 1)


def test_geotiff_mask_in_utm(tmp_path):
    west, south, east, north = _utm(ROI_LONLAT).bounds
    transform = Affine(30.0, 0, west - 300, 0, -30.0, north + 300)
    cols, rows = int((east - west + 600) / 30), int((north - south + 600) / 30)
    mask = np.zeros((rows, cols), np.uint8)
    mask[10:-10, 10:-10] = 255
    path = tmp_path / "mask.tif"
    _write_mask(path, mask, transform)
    roi = read_roi(path)
    expected_area = (rows - 20) * (cols - 20) * 900.0
    assert _utm(roi).area == pytest.approx(expected_area, rel=1e-3)


def test_geotiff_mask_errors(tmp_path):
    empty = tmp_path / "empty.tif"
    _write_mask(empty, np.zeros((4, 4), np.uint8), Affine(10, 0, 500000, 0, -10, 5760000))
    with pytest.raises(UserError, match="no pixel > 0"):
        read_roi(empty)
    no_crs = tmp_path / "nocrs.tif"
    _write_mask(no_crs, np.ones((4, 4), np.uint8), Affine(10, 0, 500000, 0, -10, 5760000), crs=None)
    with pytest.raises(UserError, match="no CRS"):
        read_roi(no_crs)


def test_rasterised_mask_matches_roi_area_and_round_trips(tmp_path):
    tile = tile_at(6.05, 52.05)
    mask = rasterize_roi(ROI_LONLAT, tile)
    assert mask.shape == (tile.height, tile.width)
    assert mask.sum() * 100.0 == pytest.approx(tile.project(ROI_LONLAT).area, rel=0.02)
    out = write_roi_mask(ROI_LONLAT, tile, tmp_path / "roi.tif")
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 32632 and src.transform == tile.transform
    np.testing.assert_array_equal(read_roi_mask(out), mask > 0)
    assert not list(tmp_path.glob(".*tmp*"))


def test_mask_of_a_tile_outside_the_roi_is_empty():
    assert rasterize_roi(ROI_LONLAT, tile_at(7.05, 52.05)).sum() == 0
