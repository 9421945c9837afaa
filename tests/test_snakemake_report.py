"""`snakemake --report` of a finished run: the quicklooks, observation counts and our HTML report
are in it, with their captions (workflow/report/*.rst)."""

from __future__ import annotations

import zipfile

from conftest import run_snakemake


def test_report_zip_holds_the_marked_outputs_and_captions(tiny_demo_run):
    workdir, config, _ = tiny_demo_run
    result = run_snakemake(workdir, "--configfile", str(config), "--report", "report.zip")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = workdir / "results"
    with zipfile.ZipFile(workdir / "report.zip") as archive:
        names = archive.namelist()
        html = archive.read("report/report.html").decode()
        # Files in the report: report/data/raw/<id>/<basename>, byte for byte the run's outputs.
        shown = {name.rsplit("/", 1)[-1]: archive.read(name) for name in names if "/data/raw/" in name}
    tiles = ["grid_5.95_52.05", "grid_6.05_52.05"]
    expected = {
        **{f"{tile}_2024.png": results / "quicklook" / "2024" / f"{tile}_2024.png" for tile in tiles},
        **{f"{tile}_2024.tif": results / "observations" / "2024" / f"{tile}_2024.tif" for tile in tiles},
        "report.html": results / "report.html",
    }
    assert sorted(shown) == sorted(expected)  # what is marked, nothing else (no Zarr, COGs, mosaics)
    for name, path in expected.items():
        assert shown[name] == path.read_bytes(), name
    # The captions, rendered with their wildcards, under their categories.
    for tile in tiles:
        assert f"PCA quicklook of tile {tile}: the first three principal components" in html
        assert f"Observation counts of tile {tile}: a two-band GeoTIFF" in html
    assert "own report for 2024, one self-contained HTML file" in html
    for category in ("Quicklooks", "Observation counts", "Report"):
        assert category in html
    assert "TESSERA embeddings of the region of interest" in html  # the workflow description
