"""STAC Collection and Items of an output directory (tessera.publish.stac).

Core STAC 1.1 schemas are validated offline (pystac bundles them; they also cover the 1.1 ``bands``,
``nodata`` and ``data_type`` fields we use). The projection, file and processing extension schemas
live on the network, so their fields are checked here against the files themselves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pystac
import pytest
import rasterio
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from shapely import box
from shapely.geometry import shape

from tessera.errors import UserError
from tessera.layout import Results, find_tiles
from tessera.publish.quicklook import fit_pca, write_tile_quicklook
from tessera.publish.stac import S1_COLLECTION, S2_COLLECTION, scene_ids_of_index, write_stac
from tessera.io import sha256_file
from test_publish_verify import DIMS, YEAR, copy_of_output_dir

CHECKPOINT_SHA = "0123456789abcdef" * 4


def _scene_ids(tiles) -> dict[tuple[str, int], dict[str, list[str]]]:
    return {(t.tile.name, t.year): {S2_COLLECTION: [f"S2B_{t.tile.name}_a", f"S2B_{t.tile.name}_b"],
                                    S1_COLLECTION: [f"S1A_{t.tile.name}"]} for t in tiles}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, Path]:
    out = copy_of_output_dir(tmp_path_factory, tmp_path_factory.mktemp("stac") / "results")
    tiles = find_tiles(Results(out))
    basis = fit_pca(tiles)
    for files in tiles[:2]:  # the third tile has no quicklook: its Item must simply omit those assets
        write_tile_quicklook(files, basis, *Results(out).quicklook(files.tile.name, YEAR))
    collection = write_stac(Results(out), find_tiles(Results(out)), family="v2", checkpoint_sha256=CHECKPOINT_SHA, source="demo",
                            variant="local", scene_ids=_scene_ids(tiles), software_version="9.9.9",
                            processing=json.loads(Results(out).metadata.read_text())["processing"])
    return out, collection


def test_items_record_the_choices_that_change_the_numbers(catalog):
    out, collection_path = catalog
    recorded = json.loads(Results(out).metadata.read_text())["processing"]
    for item in _items(collection_path):
        assert item.properties["tessera:preprocessing"] == recorded["preprocessing"]
        assert item.properties["tessera:inference"] == recorded["inference"]
        assert item.properties["tessera:preprocessing_as_trained"] is True
        assert ("Sentinel-2 resampled with bilinear, harmonisation mpc, OPERA layover/shadow pixels kept"
                in item.properties["processing:lineage"])
        assert "inference precision fp32, seed 0, 1 draw(s) per pixel" in item.properties["processing:lineage"]


def _items(collection_path: Path) -> list[pystac.Item]:
    return list(pystac.Collection.from_file(str(collection_path)).get_items())


def test_layout_and_core_schemas_offline(catalog):
    out, collection_path = catalog
    assert collection_path == out / "stac" / "collection.json"
    validator = JsonSchemaSTACValidator()
    collection = pystac.Collection.from_file(str(collection_path))
    validator.validate_core(collection.to_dict(), pystac.STACObjectType.COLLECTION, "1.1.0")
    items = list(collection.get_items())
    assert sorted(i.id for i in items) == ["grid_5.85_52.05_2024", "grid_5.95_52.05_2024", "grid_6.05_52.05_2024"]
    for item in items:
        validator.validate_core(item.to_dict(), pystac.STACObjectType.ITEM, "1.1.0")
    assert collection.extent.spatial.bboxes == [[5.8, 52.0, 6.1, 52.1]]
    assert not list(out.glob("stac/.*")), "no temporary folder left behind"


def test_core_schema_catches_a_bad_nodata(catalog):
    """The offline validation is real: a nodata that STAC 1.1 does not allow is rejected."""
    _, collection_path = catalog
    item = json.loads(next(collection_path.parent.glob("grid_*/*.json")).read_text())
    item["assets"]["scales"]["nodata"] = "none"
    with pytest.raises(pystac.STACValidationError):
        JsonSchemaSTACValidator().validate_core(item, pystac.STACObjectType.ITEM, "1.1.0")


def test_item_geometry_time_and_projection_match_the_tile(catalog):
    out, collection_path = catalog
    for item in _items(collection_path):
        files = next(f for f in find_tiles(Results(out)) if item.id == f"{f.tile.name}_{YEAR}")
        west, south, east, north = files.tile.bounds_lonlat
        assert item.bbox == [west, south, east, north]
        cell = shape(item.geometry)
        assert cell.geom_type == "Polygon" and cell.equals(box(west, south, east, north))
        assert cell.exterior.is_ccw  # GeoJSON's right-hand rule
        assert item.datetime is None
        assert item.properties["start_datetime"] == "2024-01-01T00:00:00Z"
        assert item.properties["end_datetime"] == "2024-12-31T23:59:59Z"
        assert "https://stac-extensions.github.io/projection/v2.0.0/schema.json" in item.stac_extensions
        with rasterio.open(files.landmask) as landmask:
            assert item.properties["proj:code"] == f"EPSG:{landmask.crs.to_epsg()}"
            assert item.properties["proj:shape"] == [landmask.height, landmask.width]
            assert item.properties["proj:transform"] == list(landmask.transform)[:6]
            assert item.properties["proj:bbox"] == pytest.approx(list(landmask.bounds), abs=1e-6)
        assert "proj:epsg" not in item.properties  # deprecated in projection v2


def test_assets_resolve_with_checksums_sizes_and_bands(catalog):
    out, collection_path = catalog
    for item in _items(collection_path):
        tile = item.id.rsplit("_", 1)[0]
        expected = {"embeddings", "scales", "landmask", "cog"} | ({"thumbnail", "overview"} if tile != "grid_6.05_52.05" else set())
        assert set(item.assets) == expected
        for key, asset in item.assets.items():
            assert not Path(asset.href).is_absolute() and asset.href.startswith("../../")
            path = Path(asset.get_absolute_href())
            assert path.is_file() and out in path.parents, key
            assert asset.extra_fields["file:checksum"] == "1220" + sha256_file(path)
            assert asset.extra_fields["file:size"] == path.stat().st_size
        assert item.assets["embeddings"].extra_fields["data_type"] == "int8"
        assert [b["name"] for b in item.assets["cog"].extra_fields["bands"]] == [f"Tessera_Band_{i}" for i in range(DIMS)]
        assert item.assets["cog"].extra_fields["nodata"] == "nan"
        assert item.assets["scales"].extra_fields["nodata"] == "nan"
        with rasterio.open(item.assets["cog"].get_absolute_href()) as cog:
            assert cog.descriptions[0] == item.assets["cog"].extra_fields["bands"][0]["name"]
            assert cog.dtypes[0] == item.assets["cog"].extra_fields["data_type"]


def test_provenance(catalog):
    out, collection_path = catalog
    tiles = find_tiles(Results(out))
    for item in _items(collection_path):
        props = item.properties
        assert props["tessera:model_family"] == "v2"
        assert props["tessera:checkpoint_sha256"] == CHECKPOINT_SHA
        assert props["tessera:data_source"] == "demo"
        assert props["tessera:variant"] == "local"
        assert props["processing:software"] == {"tessera-workflow": "9.9.9"}
        name, year = item.id.rsplit("_", 1)
        assert props["tessera:scenes"] == _scene_ids(tiles)[(name, int(year))]


def test_catalog_moves_with_the_output_directory(catalog, tmp_path):
    out, _ = catalog
    moved = Path(shutil.copytree(out, tmp_path / "moved"))
    for item in _items(moved / "stac" / "collection.json"):
        for asset in item.assets.values():
            path = Path(asset.get_absolute_href())
            assert moved in path.parents and path.is_file()


def test_missing_scene_ids_name_the_tile(catalog):
    out, _ = catalog
    scene_ids = _scene_ids(find_tiles(Results(out)))
    del scene_ids[("grid_5.95_52.05", YEAR)]
    with pytest.raises(UserError, match="no scene ids for tile.*grid_5.95_52.05"):
        write_stac(Results(out), find_tiles(Results(out)), family="v2", checkpoint_sha256=CHECKPOINT_SHA, source="demo", variant="local",
                   scene_ids=scene_ids)


def test_empty_output_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no complete tile"):
        write_stac(Results(tmp_path), find_tiles(Results(tmp_path)), family="v2", checkpoint_sha256=CHECKPOINT_SHA, source="demo", variant="local",
                   scene_ids={})


def test_scene_ids_of_index():
    index = {
        "s2": {"scenes": [["S2B_2", "S2A_1"], ["S2A_3"]], "skipped": {}},
        "s1": {"skipped": {}, "ascending": {"scenes": [["S1A_asc"]]}, "descending": {"scenes": [["S1A_desc_b", "S1A_desc_a"]]}},
    }
    assert scene_ids_of_index(index) == {
        S2_COLLECTION: ["S2A_1", "S2A_3", "S2B_2"],
        S1_COLLECTION: ["S1A_asc", "S1A_desc_a", "S1A_desc_b"],
    }
