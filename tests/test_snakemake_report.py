"""`snakemake --report` of a finished run: the quicklooks, observation counts and our HTML report
are in it, with their captions (workflow/report/*.rst)."""

from __future__ import annotations

import zipfile

from conftest import run_snakemake


def test_report_zip_holds_the_marked_outputs_and_captions(tiny_demo_run):
    workdir, config, _ = tiny_demo_run
    result = run_snakemake(workdir, "--configfile", str(config), "--report", "report.zip")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with zipfile.ZipFile(workdir / "report.zip") as archive:
        names = archive.namelist()
        text = "\n".join(archive.read(n).decode("utf-8", "replace") for n in names
                         if n.endswith((".html", ".js", ".json")))
    results = [n for n in names if "/data/raw/" in n]
    tiles = ["grid_5.95_52.05", "grid_6.05_52.05"]
    for tile in tiles:
        assert any(n.endswith(f"quicklook/2024/{tile}_2024.png") for n in results), results
        assert any(n.endswith(f"observations/2024/{tile}_2024.tif") for n in results), results
    assert any(n.endswith("results/report_2024.html") for n in results), results
    assert not any(n.endswith(".zarr") or "/tessera.zarr/" in n for n in results)  # only what is marked
    # The captions, rendered with their wildcards, and the categories.
    for tile in tiles:
        assert f"PCA quicklook of tile {tile}_2024" in text
        assert f"Observation counts of tile {tile}" in text
    assert "The workflow&#39;s own report for 2024" in text or "The workflow's own report for 2024" in text
    for category in ("Quicklooks", "Observation counts", "Report"):
        assert category in text
    assert "TESSERA embeddings of the region of interest" in text  # the workflow description
