import pytest
import yaml

from tessera import config as cfg
from tessera.errors import UserError
from tessera.plan import make_plan

DEMO_ROI = "5.992,52.040,6.008,52.046"


def test_defaults_are_filled():
    config = cfg.validate({"roi": DEMO_ROI, "year": 2024})
    assert config["source"] == "demo"
    assert config["model"] == {"family": "v2", "checkpoint": "demo", "trust_checkpoint": False,
                               "allow_source_mismatch": False, "allow_preprocessing_mismatch": False,
                               "cache_dir": None, "sha256": None}
    assert config["patch_size"] == 512 and config["output_dir"] == "results" and config["device"] == "auto"
    assert config["fetch"]["min_coverage_pct"] == 0.01


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"yeer": 2024}, "unknown key 'yeer'"),
        ({"model": {"famly": "v2"}}, "unknown key 'famly' in 'model'"),
        ({"year": 2030}, "config key 'year': 2030 is greater than the maximum of 2025"),
        ({"year": 2016}, "config key 'year': 2016 is less than the minimum of 2017"),
        ({"year": "2024"}, "config key 'year': '2024' is not a year, a list of years or a range"),
        ({"source": "sentinelhub"}, "config key 'source': 'sentinelhub' is not one of demo"),
        ({"model": {"family": "v3"}}, "config key 'model.family': 'v3' is not one of v2, v1.0, v1.0-qat, v1.1"),
        ({"device": "tpu"}, "config key 'device'"),
        ({"patch_size": 8}, "config key 'patch_size'"),
    ],
)
def test_bad_values_name_the_key(bad, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        cfg.validate(cfg.merge({"roi": DEMO_ROI, "year": 2024}, bad))


def test_missing_required_key():
    with pytest.raises(UserError, match="'roi' is required"):
        cfg.validate({"year": 2024})


def test_config_files_merge_like_snakemake(tmp_path):
    base, over = tmp_path / "a.yaml", tmp_path / "b.yaml"
    base.write_text(yaml.safe_dump({"roi": DEMO_ROI, "year": 2024, "model": {"family": "v2", "checkpoint": "x.pt"}}))
    over.write_text(yaml.safe_dump({"model": {"checkpoint": "y.pt"}}))
    config = cfg.load([base, over])
    assert config["model"] == {"family": "v2", "checkpoint": "y.pt", "trust_checkpoint": False,
                               "allow_source_mismatch": False, "allow_preprocessing_mismatch": False,
                               "cache_dir": None, "sha256": None}
    with pytest.raises(UserError, match="does not exist"):
        cfg.load([tmp_path / "missing.yaml"])
    (tmp_path / "bad.yaml").write_text("roi: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        cfg.load([tmp_path / "bad.yaml"])


def test_shipped_configs_are_valid():
    for path in ["config/config.yaml", "config/demo.yaml"]:
        cfg.load([path])


def test_plan_of_the_demo_roi():
    plan = make_plan(cfg.validate({"roi": DEMO_ROI, "year": 2024, "patch_size": 32, "infer": {"per": "patch"}}))
    assert [t.name for t in plan.tiles] == ["grid_5.95_52.05", "grid_6.05_52.05"]
    counts = plan.job_counts()
    assert counts["fetch"] == 2 and counts["infer"] == sum(len(t.patches) for t in plan.tiles) >= 4
    per_tile = make_plan(cfg.validate({"roi": DEMO_ROI, "year": 2024, "patch_size": 32}))
    assert per_tile.job_counts()["infer"] == 2
    for tile in plan.tiles:
        covered = sum(p.width * p.height for p in tile.patches)
        assert covered == tile.window.width * tile.window.height


def test_an_l_shaped_roi_skips_empty_patches(tmp_path):
    import json

    import shapely
    from shapely import box

    l_shape = shapely.union_all([box(6.01, 52.01, 6.02, 52.03), box(6.01, 52.01, 6.03, 52.02)])
    path = tmp_path / "l.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(l_shape)}))
    (tile,) = make_plan(cfg.validate({"roi": str(path), "year": 2024, "patch_size": 64})).tiles
    all_patches = (tile.window.width // 64 + 1) * (tile.window.height // 64 + 1)
    assert 0 < len(tile.patches) < all_patches


def test_max_tiles_guard():
    with pytest.raises(UserError, match="more than max_tiles=2000"):
        make_plan(cfg.validate({"roi": "0,40,10,50", "year": 2024}))


def test_plan_estimates_use_cached_searches(tmp_path):
    import json

    from tessera.plan import TYPICAL_S2_ITEMS, estimates

    config = cfg.validate({"roi": DEMO_ROI, "year": 2024, "patch_size": 32, "work_dir": str(tmp_path)})
    plan = make_plan(config)
    before = estimates(plan)
    assert before["cached_searches"] == 0 and before["s2_scenes"] == 2 * TYPICAL_S2_ITEMS
    assert before["macs"] == pytest.approx(before["pixels"] * 0.43e9)
    cache = tmp_path / "2024" / plan.tiles[0].name / "search_s2.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"type": "FeatureCollection", "features": [{}] * 7}))
    after = estimates(plan)
    assert after["cached_searches"] == 1 and after["s2_scenes"] == TYPICAL_S2_ITEMS + 7
    assert after["download_bytes"] < before["download_bytes"]
    prefix = estimates(make_plan(cfg.validate({**config, "export": {"dims": 16, "cog": False}})))
    assert prefix["output_bytes"] == pytest.approx(before["output_bytes"] * (16 + 4) / (128 + 4))
    assert prefix["cog_bytes"] == 0 < before["cog_bytes"] and before["float32_bytes"] == 0


def test_source_stac_needs_its_mapping():
    with pytest.raises(UserError, match="source stac needs a 'stac' mapping"):
        cfg.validate({"roi": DEMO_ROI, "year": 2024, "source": "stac"})
    config = cfg.validate({"roi": DEMO_ROI, "year": 2024, "source": "stac",
                           "stac": {"url": "http://x", "s2_collection": "a", "s1_collection": "b"}})
    assert config["stac"]["url"] == "http://x"


@pytest.mark.parametrize("family, given, expected", [
    ("v1.0", None, "nearest"), ("v1.0-qat", None, "nearest"), ("v1.1", None, "nearest"),
    ("v2", None, "bilinear"), ("v2-teacher", None, "bilinear"),
    ("v1.1", "family", "nearest"), ("v1.1", "null", "nearest"), ("v1.1", "bilinear", "bilinear"),
    ("v2", "nearest", "nearest"),
])
def test_s2_resampling_follows_the_family_unless_given(family, given, expected):
    """v1.x checkpoints were trained on nearest (the reference until 228c658), v2 on bilinear; the
    user's explicit setting wins. The rule's flags give the same back to `tessera fetch`."""
    import argparse
    import dataclasses

    from tessera.options import FetchOptions

    fetch = {} if given is None else {"s2_resampling": None if given == "null" else given}
    config = cfg.validate({"roi": DEMO_ROI, "year": 2024, "model": {"family": family}, "fetch": fetch})
    options = FetchOptions.from_config(config)
    assert options.s2_method == expected and options.s1_mask_layover is False
    parser = argparse.ArgumentParser()
    FetchOptions.add_arguments(parser)
    again = FetchOptions.from_args(parser.parse_args(options.cli_args().split()))
    assert dataclasses.replace(again, family=None) == options and again.s2_method == expected
    assert "--family" not in options.cli_args()  # a family with the same defaults fetches the same
    # `tessera fetch` without the flag follows its --family.
    assert FetchOptions.from_args(parser.parse_args(["--family", family])).s2_method == FetchOptions.from_config(
        cfg.validate({"roi": DEMO_ROI, "year": 2024, "model": {"family": family}})).s2_method


def test_the_plan_is_kept_in_the_work_directory_and_reused(tmp_path, monkeypatch):
    """Every read of the Snakefile plans the ROI: a country's tiles are planned once, then loaded."""
    import tessera.plan

    config = cfg.validate({"roi": DEMO_ROI, "year": 2024, "patch_size": 32, "work_dir": str(tmp_path)})
    first = make_plan(config)
    assert len(list((tmp_path / "plan").glob("tiles-*.json"))) == 1
    monkeypatch.setattr(tessera.plan, "plan_tiles", lambda *args: pytest.fail("planned again"))
    again = make_plan(config)
    assert again.tiles == first.tiles
    monkeypatch.undo()
    other = make_plan(cfg.validate({**config, "patch_size": 16}))  # another patch size: another plan
    assert sum(len(t.patches) for t in other.tiles) > sum(len(t.patches) for t in first.tiles)
    assert len(list((tmp_path / "plan").glob("tiles-*.json"))) == 2
