"""Shorter periods and the S1 orbit filter (config ``period``, ``fetch.s1_orbit_state``): validation,
the fetch flags, the dataset variant, one kind of time series per directory, and the demo run with
both."""

import datetime as dt
import json

import pyarrow.parquet as pq
import pystac
import pytest

from conftest import run_snakemake, write_tiny_config
from tessera import config as cfg
from tessera.cli import main
from tessera.errors import UserError
from tessera.options import FetchOptions
from tessera.layout import TIME_SERIES_FILE
from tessera.period import WHOLE_YEAR, Period, claim_directories, variant_of

ROI = "6.0,52.0,6.1,52.1"


@pytest.mark.parametrize("period, year, expected", [
    ({"start": "04-01", "end": "09-30"}, "2018-2020", {"start": "04-01", "end": "09-30"}),
    ({"start": dt.date(2024, 4, 1), "end": dt.date(2024, 9, 30)}, 2024, {"start": "04-01", "end": "09-30"}),
    ({"start": "02-29", "end": "03-01"}, [2020, 2024], {"start": "02-29", "end": "03-01"}),
    ({"start": "01-01", "end": "12-31"}, 2024, None),  # the whole year is no period
    (None, 2024, None),
])
def test_a_period_is_month_days_of_every_year_or_dates_of_the_one_year(period, year, expected):
    assert cfg.validate({"roi": ROI, "year": year, "period": period})["period"] == expected


@pytest.mark.parametrize("period, year, message", [
    ({"start": "09-01", "end": "04-30"}, 2024, r"end 04-30 is before start 09-01: give start <= end"),
    ({"start": "2023-04-01", "end": "2023-09-30"}, 2024, r"'period.start': 2023-04-01 is outside year 2024"),
    ({"start": "2024-04-01", "end": "2025-01-31"}, 2024, r"'period.end': 2025-01-31 is outside year 2024"),
    ({"start": "2024-04-01", "end": "2024-09-30"}, [2023, 2024], r"full dates need a single year.*give month-days"),
    ({"start": "04-01", "end": "2024-09-30"}, 2024, r"give start and end alike"),
    ({"start": "02-29", "end": "03-31"}, "2023-2024", r"'02-29' is not a day of 2023: give 02-28 or 03-01"),
    ({"start": "04-31", "end": "05-31"}, 2024, r"'04-31' is not a day of the calendar"),
    ({"start": "April", "end": "05-31"}, 2024, r"'period.start': 'April' is not a date: give MM-DD"),
    ({"start": "04-01"}, 2024, r"'period': give a mapping of start and end dates"),
    ("04-01/09-30", 2024, r"'period': give a mapping of start and end dates"),
])
def test_bad_periods_are_one_line_naming_the_key_and_the_fix(period, year, message):
    with pytest.raises(UserError, match=message) as error:
        cfg.validate({"roi": ROI, "year": year, "period": period})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("04-01", "is not MM-DD/MM-DD"),
    ("13-40/12-31", "13-40 does not exist"),
    ("06-30/04-01", "ends before it starts"),
])
def test_bad_period_flags_are_one_line(text, message):
    with pytest.raises(UserError, match=message) as refused:
        Period.parse(text)
    assert "\n" not in str(refused.value)


def test_a_period_day_missing_from_a_year_is_one_line():
    with pytest.raises(UserError, match="02-29 does not exist in 2023"):
        Period.parse("02-29/03-31").dates(2023)
    assert Period.parse("02-29/03-31").dates(2024).days == 32


def test_a_damaged_time_series_record_is_one_line_naming_it(tmp_path):
    (tmp_path / TIME_SERIES_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"{TIME_SERIES_FILE} is damaged .*delete it"):
        claim_directories([("output_dir", tmp_path)], WHOLE_YEAR, "both", write=False)


def test_the_orbit_filter_is_the_references_three_states():
    assert cfg.validate({"roi": ROI, "year": 2024})["fetch"]["s1_orbit_state"] == "both"
    with pytest.raises(UserError, match="'fetch.s1_orbit_state': 'up' is not one of both, ascending, descending"):
        cfg.validate({"roi": ROI, "year": 2024, "fetch": {"s1_orbit_state": "up"}})


def test_the_fetch_flags_carry_period_and_orbit_and_stay_as_before_without_them():
    import argparse

    plain = FetchOptions.from_config(cfg.validate({"roi": ROI, "year": 2024}))
    assert "--period" not in plain.cli_args() and "orbit" not in plain.cli_args()  # finished runs stay up to date
    assert plain.time_series == (WHOLE_YEAR, "both")
    options = FetchOptions.from_config(cfg.validate({"roi": ROI, "year": [2023, 2024], "period": {"start": "04-01",
                                                     "end": "06-30"}, "fetch": {"s1_orbit_state": "descending"}}))
    parser = argparse.ArgumentParser()
    FetchOptions.add_arguments(parser)
    again = FetchOptions.from_args(parser.parse_args(options.cli_args().split()))
    assert again.time_series == options.time_series == (Period.parse("04-01/06-30"), "descending")


def test_the_variant_names_the_period_and_the_orbit():
    assert variant_of("local", WHOLE_YEAR, "both") == "local"
    assert variant_of("local", Period.parse("04-01/09-30"), "both") == "local_0401-0930"
    assert variant_of("local", WHOLE_YEAR, "ascending") == "local_ascending"
    assert variant_of("mine", Period.parse("04-01/09-30"), "descending") == "mine_0401-0930_descending"


def test_the_plan_expects_fewer_scenes_of_a_period_and_of_one_orbit_direction(tmp_path):
    from tessera.plan import TYPICAL_S1_ITEMS, TYPICAL_S2_ITEMS, estimates, make_plan

    config = {"roi": "5.998,52.040,6.002,52.042", "year": 2024, "work_dir": str(tmp_path)}
    whole = estimates(make_plan(cfg.validate(config)))
    spring = estimates(make_plan(cfg.validate({**config, "period": {"start": "04-01", "end": "06-30"},
                                               "fetch": {"s1_orbit_state": "ascending"}})))
    assert whole["s2_scenes"] == 2 * TYPICAL_S2_ITEMS and whole["s1_scenes"] == 2 * TYPICAL_S1_ITEMS
    assert spring["s2_scenes"] == 2 * round(TYPICAL_S2_ITEMS * 91 / 366)  # 91 of 2024's 366 days
    assert spring["s1_scenes"] == 2 * round(TYPICAL_S1_ITEMS * 91 / 366 / 2)
    # A cached S1 search holds both directions: only the kept one counts.
    cache = tmp_path / "2024" / "grid_5.95_52.05" / "search_s1.json"
    cache.parent.mkdir(parents=True)
    # Feeds differ in case, and the fetch reads "ASCENDING" as ascending; an item without a direction
    # is never fetched.
    cache.write_text(json.dumps({"features": [{"properties": {"sat:orbit_state": orbit}}
                                              for orbit in ("ascending", "ASCENDING", "descending", "descending")]
                                             + [{"properties": {}}]}))
    cached = estimates(make_plan(cfg.validate({**config, "fetch": {"s1_orbit_state": "ascending"}})))
    assert cached["s1_scenes"] == 2 + round(TYPICAL_S1_ITEMS / 2)
    both = estimates(make_plan(cfg.validate(config)))
    assert both["s1_scenes"] == 4 + TYPICAL_S1_ITEMS


def test_tessera_plan_names_the_time_series_and_its_variant(tmp_path, capsys):
    config = write_tiny_config(tmp_path, period={"start": "04-01", "end": "06-30"}, work_dir=str(tmp_path / "work"))
    assert main(["plan", "--config", str(config)]) == 0
    assert "time series: 04-01 to 06-30 of the year, both S1 orbit directions; dataset variant local_0401-0630" \
        in capsys.readouterr().out.splitlines()


def test_a_directory_holds_one_kind_of_time_series(tmp_path):
    spring = Period.parse("03-01/05-31")
    dirs = [("output_dir", tmp_path / "results"), ("work_dir", tmp_path / "work")]
    claim_directories(dirs, spring, "both", write=False)  # checking writes nothing
    assert not (tmp_path / "results").exists()
    claim_directories(dirs, spring, "both", write=True)
    recorded = json.loads((tmp_path / "work" / TIME_SERIES_FILE).read_text())
    assert recorded == {"period": "03-01/05-31", "s1_orbit_state": "both"}
    claim_directories(dirs, spring, "both", write=True)  # the same kind again
    with pytest.raises(UserError, match=r"output_dir '.*results' holds embeddings of 03-01 to 05-31 of the year, both "
                                        r"S1 orbit directions; this config asks for the whole year, both S1 orbit "
                                        r"directions: give the run its own output_dir and work_dir"):
        claim_directories(dirs, WHOLE_YEAR, "both", write=True)
    # A directory filled before periods existed holds whole years of both orbits.
    (tmp_path / "old" / "2024").mkdir(parents=True)
    with pytest.raises(UserError, match="work_dir .* holds embeddings of the whole year, both S1 orbit directions"):
        claim_directories([("work_dir", tmp_path / "old")], spring, "both", write=True)
    claim_directories([("work_dir", tmp_path / "old")], WHOLE_YEAR, "both", write=True)
    assert (tmp_path / "old" / TIME_SERIES_FILE).exists()
    # Anything else in a directory (output_dir: ".", say) is no time series.
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("mine")
    claim_directories([("output_dir", tmp_path / "shared")], spring, "both", write=False)


# --- the demo with a period and an orbit filter ---------------------------------------------------

PERIOD = {"start": "04-01", "end": "06-30"}


@pytest.fixture(scope="module")
def spring_descending(tmp_path_factory):
    """The tiny demo over 1 April - 30 June with only descending S1 passes (the demo's catalog has
    scenes all year, in both directions)."""
    workdir = tmp_path_factory.mktemp("period")
    config = write_tiny_config(workdir, period=PERIOD, fetch={"s1_orbit_state": "descending"})
    result = run_snakemake(workdir, "--configfile", str(config), "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, config


@pytest.mark.slow
def test_the_stacks_hold_only_the_periods_dates_and_the_descending_passes(spring_descending):
    workdir, _ = spring_descending
    for tile in ("grid_5.95_52.05", "grid_6.05_52.05"):
        index = json.loads((workdir / "work" / "2024" / tile / "stack.json").read_text())
        dates = index["s2"]["dates"] + index["s1"]["descending"]["dates"]
        assert index["s2"]["dates"] and index["s1"]["descending"]["dates"]
        assert all("2024-04-01" <= date <= "2024-06-30" for date in dates), dates
        assert index["s1"]["ascending"]["dates"] == [] and index["s1"]["ascending"]["arrays"]["sar"]["shape"][0] == 0
        assert index["preprocessing"]["period"] == "04-01/06-30"
        assert index["preprocessing"]["s1_orbit_state"] == "descending"
        # The search covered the period and found ascending passes in it: the filter left them out.
        searched = json.loads((workdir / "work" / "2024" / tile / "search_s1.json").read_text())
        assert searched["tessera:query"]["dates"] == ["2024-04-01", "2024-06-30"]
        assert any(item["properties"]["sat:orbit_state"] == "ascending" for item in searched["features"])


@pytest.mark.slow
def test_the_outputs_say_they_are_not_the_full_year_product(spring_descending, capsys):
    workdir, _ = spring_descending
    results = workdir / "results"
    sidecar = json.loads((results / "tessera_metadata.json").read_text())
    assert sidecar["dataset_variant"] == "local_0401-0630_descending"
    assert sidecar["processing"]["preprocessing"]["period"] == "04-01/06-30"
    assert sidecar["processing"]["preprocessing"]["s1_orbit_state"] == "descending"
    variants = pq.read_table(results / "manifest.parquet").column("variant").to_pylist()
    assert set(variants) == {"local_0401-0630_descending"}
    collection = pystac.Collection.from_file(str(results / "stac" / "collection.json"))
    items = list(collection.get_items(recursive=True))
    assert items and all(item.properties["tessera:variant"] == "local_0401-0630_descending" for item in items)
    for item in items:
        assert item.common_metadata.start_datetime == dt.datetime(2024, 4, 1, tzinfo=dt.UTC)
        assert item.common_metadata.end_datetime == dt.datetime(2024, 6, 30, 23, 59, 59, tzinfo=dt.UTC)
        lineage = item.properties["processing:lineage"]
        assert "time series of 04-01 to 06-30 of the year, S1 descending passes only" in lineage
    report = (results / "report.html").read_text()
    assert "time series</td><td class=name>04-01 to 06-30 of the year, S1 descending passes only</td>" in report
    assert main(["verify", str(results)]) == 0
    assert "time series of 04-01 to 06-30 of the year, S1 descending passes only (dataset variant " \
           "local_0401-0630_descending" in capsys.readouterr().out


@pytest.mark.slow
def test_a_full_year_run_into_the_same_directories_is_refused_and_changes_nothing(spring_descending, tmp_path):
    workdir, config = spring_descending
    metadata = workdir / "results" / "tessera_metadata.json"
    before = metadata.read_bytes(), metadata.stat().st_mtime_ns
    full_year = write_tiny_config(tmp_path)
    refused = run_snakemake(workdir, "--configfile", str(full_year), "--cores", "2")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "tessera: error: output_dir 'results' holds embeddings of 04-01 to 06-30 of the year, S1 descending passes "
        "only; this config asks for the whole year, both S1 orbit directions: give the run its own output_dir and "
        "work_dir (or delete results)")
    assert (metadata.read_bytes(), metadata.stat().st_mtime_ns) == before
    # In its own directories the full year runs; the period run itself stays complete.
    apart = write_tiny_config(tmp_path, output_dir="results-full-year", work_dir="work-full-year")
    assert run_snakemake(workdir, "-n", "--configfile", str(apart), "--cores", "1").returncode == 0
    again = run_snakemake(workdir, "-n", "--configfile", str(config), "--cores", "1")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
