"""The Snakemake layer: dry-run job lists, lint, and one-line config errors."""

import yaml

from conftest import REPO, job_stats, run_snakemake
from tessera import config as cfg
from tessera.cli import main as tessera_main
from tessera.plan import make_plan


def test_dry_run_lists_every_job_of_the_plan(tmp_path):
    result = run_snakemake(tmp_path, "-n", "--configfile", str(REPO / "config/demo.yaml"), "--cores", "2")
    assert result.returncode == 0, result.stderr
    stats = job_stats(result.stdout)
    expected = make_plan(cfg.load([REPO / "config/config.yaml", REPO / "config/demo.yaml"])).job_counts()
    assert stats.pop("total") == sum(expected.values())
    assert stats == dict(expected)
    assert stats["infer"] >= 4 and stats["fetch"] >= 2
    assert not (tmp_path / "results").exists()  # a dry-run writes nothing


def test_lint_is_clean(tmp_path):
    result = run_snakemake(tmp_path, "--lint", "--configfile", str(REPO / "config/demo.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"roi": "6.03,52.02,6.01,52.03"}))
    result = run_snakemake(tmp_path, "-n", "--configfile", str(bad), "--cores", "1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "tessera: error" in line]
    assert errors == ["tessera: error: roi bbox '6.03,52.02,6.01,52.03' is reversed or empty: expected min_lon,min_lat,max_lon,max_lat with min < max"]
    assert "Traceback" not in result.stderr


def test_plan_command_prints_tiles_and_jobs(capsys):
    assert tessera_main(["plan", "--config", str(REPO / "config/demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "grid_5.95_52.05" in out and "grid_6.05_52.05" in out and "32631" in out and "32632" in out
    assert "jobs:" in out and "infer 18" in out  # tiles overlap a little: 9 patches each


def test_plan_command_bad_input_exits_2(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"roi": str(tmp_path / "missing.geojson"), "year": 2024}))
    assert tessera_main(["plan", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
