import pytest
from rasterio.windows import Window
from shapely import box

from tessera.errors import UserError
from tessera.grid import Tile, patch_name, patches, roi_in_tile, tile_at, tiles_for_geometry, utm_epsg, work_window


def test_tile_geometry_matches_geotessera_project_tile():
    # Values verified with geotessera (ECOSYSTEM.md §1.2–1.3): origin 300933.94, 5776128.48,
    # 1139 rows x 729 columns, EPSG:32631.
    tile = tile_at(0.15, 52.05)
    assert tile.name == "grid_0.15_52.05"
    assert tile.epsg == 32631
    assert tile.transform.c == pytest.approx(300933.94, abs=0.01)
    assert tile.transform.f == pytest.approx(5776128.48, abs=0.01)
    assert (tile.transform.a, tile.transform.e) == (10.0, -10.0)
    assert (tile.height, tile.width) == (1139, 729)


@pytest.mark.parametrize(
    "lon, lat, name",
    [
        (0.17, 52.23, "grid_0.15_52.25"),  # geotessera's tile_from_world example
        (-50.51, -20.69, "grid_-50.55_-20.65"),
        (5.99, 52.0, "grid_5.95_52.05"),  # 5.99 * 10 is 59.900000000000006 in floats
        (6.0, 52.04, "grid_6.05_52.05"),  # a point on an edge belongs east / north
        (0.0, 0.0, "grid_0.05_0.05"),
        (180.0, 90.0, "grid_179.95_89.95"),
    ],
)
def test_point_to_tile(lon, lat, name):
    assert tile_at(lon, lat).name == name


def test_tile_name_round_trip_and_bad_names():
    assert Tile.from_name("grid_-50.55_-20.65") == tile_at(-50.55, -20.65)
    with pytest.raises(UserError, match="grid_<lon>_<lat>"):
        Tile.from_name("grid_6.00_52.00")
    with pytest.raises(UserError, match="outside"):
        tile_at(52.0, 200.0)


def test_utm_zone_from_centre_and_hemisphere():
    assert utm_epsg(5.95, 52.05) == 32631
    assert utm_epsg(6.05, 52.05) == 32632
    assert tile_at(-50.55, -20.65).epsg == 32722
    assert utm_epsg(179.95, 0.05) == 32660


def test_roi_straddling_a_zone_edge_gives_tiles_in_both_zones():
    roi = box(5.992, 52.040, 6.008, 52.046)
    found = {tile.name: part for tile, part in tiles_for_geometry(roi)}
    assert sorted(found) == ["grid_5.95_52.05", "grid_6.05_52.05"]
    assert found["grid_5.95_52.05"].bounds == pytest.approx((5.992, 52.040, 6.0, 52.046))


def test_roi_on_cell_edges_does_not_pull_in_neighbours():
    roi = box(6.0, 52.0, 6.1, 52.1)
    assert [t.name for t, _ in tiles_for_geometry(roi)] == ["grid_6.05_52.05"]


def test_work_window_covers_roi_and_whole_tile_for_whole_cell():
    tile = tile_at(6.05, 52.05)
    whole = work_window(tile, roi_in_tile(tile, box(*tile.bounds_lonlat)))
    assert whole == tile.full_window
    small = work_window(tile, roi_in_tile(tile, box(6.0, 52.040, 6.008, 52.046)))
    # 0.008° of longitude at 52° N is about 548 m, 0.006° of latitude about 668 m; the projected
    # box is a little larger because the cell is rotated against grid north (convergence).
    assert 55 <= small.width <= 59 and 67 <= small.height <= 71
    # The window's footprint contains the projected ROI.
    assert tile.pixel_box(small).buffer(1e-6).contains(tile.project(box(6.0, 52.040, 6.008, 52.046)))


def test_patches_cover_window_exactly_once():
    window = Window(10, 20, 130, 70)
    cut = patches(window, 64)
    assert [(p.col_off, p.row_off, p.width, p.height) for p in cut] == [
        (10, 20, 64, 64), (74, 20, 64, 64), (138, 20, 2, 64),
        (10, 84, 64, 6), (74, 84, 64, 6), (138, 84, 2, 6),
    ]
    assert sum(p.width * p.height for p in cut) == window.width * window.height
    assert patch_name(cut[4]) == "r84_c74"


def test_tile_width_shrinks_towards_the_poles():
    equator, north = tile_at(10.05, 0.05), tile_at(10.05, 70.05)
    assert equator.width == pytest.approx(1113, abs=2)
    assert north.width < equator.width * 0.4  # cos(70°) = 0.34, plus convergence


def test_a_tile_embeds_its_whole_rectangle_when_the_roi_covers_its_neighbours():
    """Neighbouring tiles overlap (their UTM rectangles are larger than their cells), so that a
    mosaic has no gaps along cell edges."""
    from tessera.roi import rasterize_roi

    tile = tile_at(6.05, 52.05)
    assert rasterize_roi(box(5.9, 51.9, 6.2, 52.2), tile).all()
    only_the_cell = rasterize_roi(box(*tile.bounds_lonlat), tile)
    assert 0.9 * only_the_cell.size < only_the_cell.sum() < only_the_cell.size
    assert work_window(tile, roi_in_tile(tile, box(7.5, 52.0, 7.6, 52.1))) is None
