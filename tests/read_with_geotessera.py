"""Read an output directory with the geotessera of *this* interpreter, offline, and write down what it returns.

    python tests/read_with_geotessera.py RESULTS_DIR OUT_DIR

tests/test_geotessera_current.py runs this with a Python 3.13 that has geotessera >= 0.10 (0.8 and
later need Python >= 3.12) and makes the comparisons itself. No tessera import here: only
geotessera and what it depends on.

The call is the offline one of README's Outputs section: version and variant from the directory's
tessera_metadata.json, manifest.parquet and landmasks.parquet from the directory itself. Every
attempt to open a network connection is refused and recorded (geotessera swallows some download
failures, e.g. of the landmask registry, into a warning).

Writes OUT_DIR/report.json and, per tile-year, OUT_DIR/{year}_{tile}.npy: fetch_embedding's array
cut to the rows and columns that have values (report.json: where the cut starts, the whole shape).
OUT_DIR/points.json, if present ({"year": Y, "points": [[lon, lat], ...]}), is sampled with
sample_embeddings_at_points into OUT_DIR/sampled.npy.

RESULTS_DIR/tessera.zarr is read the way geotessera reads a Zarr store (module geotessera.store,
0.10 and later), from its local path: GeoTesseraZarr(path).sample_points at the same points into
OUT_DIR/zarr_sampled.npy; read_region of each bbox of points.json's "regions" into
OUT_DIR/zarr_region_{i}.npy (report.json: its CRS and transform); and the CLI's
`geotessera download --source zarr --store-url PATH --bbox B` of points.json's "export_bbox"
into OUT_DIR/zarr_export/ (one GeoTIFF per UTM zone).
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

ATTEMPTS: list[str] = []


def _refuse(kind):
    def refuse(*args, **kwargs):
        ATTEMPTS.append(f"{kind} {args[1:] if kind == 'connect' else args[:2]}")
        raise OSError(f"network disabled by {Path(__file__).name}")
    return refuse


def main(results: Path, out: Path) -> None:
    socket.socket.connect = _refuse("connect")
    socket.socket.connect_ex = _refuse("connect")
    socket.getaddrinfo = _refuse("getaddrinfo")
    socket.create_connection = _refuse("create_connection")
    from geotessera import GeoTessera

    sidecar = json.loads((results / "tessera_metadata.json").read_text())
    with tempfile.TemporaryDirectory() as cache:
        gt = GeoTessera(dataset_version=sidecar["dataset_version"], dataset_variant=sidecar["dataset_variant"],
                        embeddings_dir=results, registry_dir=results, cache_dir=cache)
        tiles = sorted(gt.registry.get_available_embeddings())
        report = {"geotessera": version("geotessera"), "python": sys.version.split()[0], "tiles": {}}
        for year, lon, lat in tiles:
            name = f"grid_{lon:.2f}_{lat:.2f}"
            embedding, crs, transform = gt.fetch_embedding(lon, lat, year)
            # The whole tile is ~0.4 GB of float32: keep the rows and columns that have values, and
            # how many values there are in all (so the reader can tell that none lie outside).
            rows, cols = np.nonzero(np.isfinite(embedding).any(axis=2))
            crop = embedding[rows.min():rows.max() + 1, cols.min():cols.max() + 1] if len(rows) else embedding[:0, :0]
            np.save(out / f"{year}_{name}.npy", crop)
            report["tiles"][f"{year}/{name}"] = {
                "shape": list(embedding.shape), "offset": [int(rows.min()), int(cols.min())] if len(rows) else None,
                "finite": int(np.isfinite(embedding).sum()),
                "epsg": crs.to_epsg(), "transform": list(transform)[:6],
                # Raises unless landmasks.parquet was read and lists the tile.
                "landmask_size": gt.registry.get_landmask_file_size(lon, lat),
            }
        # The manifest's spatial index: the tiles whose cells meet the bounding box of all tile centres.
        lons, lats = [lon for _, lon, _ in tiles], [lat for _, _, lat in tiles]
        report["in_region"] = sorted(
            f"{year}/grid_{lon:.2f}_{lat:.2f}"
            for year in sorted({t[0] for t in tiles})
            for _, lon, lat in gt.registry.load_blocks_for_region((min(lons), min(lats), max(lons), max(lats)), year)
        )
        if (out / "points.json").exists():
            request = json.loads((out / "points.json").read_text())
            points = [tuple(p) for p in request["points"]]
            np.save(out / "sampled.npy", gt.sample_embeddings_at_points(points, year=request["year"], auto_download=False))
        store = results / "tessera.zarr"
        if store.exists() and (out / "points.json").exists():
            report["zarr"] = read_zarr(store, out, json.loads((out / "points.json").read_text()))
    report["network_attempts"] = ATTEMPTS
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")


def read_zarr(store: Path, out: Path, request: dict) -> dict:
    """The Zarr store through geotessera's own reader (GeoTesseraZarr) and its CLI's Zarr export."""
    from geotessera import GeoTesseraZarr
    from geotessera.cli import app

    year, points = request["year"], [tuple(p) for p in request["points"]]
    gz = GeoTesseraZarr(store)
    report = {"years": gz.years, "n_bands": gz.n_bands, "model": gz.model_version, "regions": []}
    np.save(out / "zarr_sampled.npy", gz.sample_points(points, year=year))
    for i, bbox in enumerate(request.get("regions", [])):
        mosaic, transform, crs = gz.read_region(tuple(bbox), year)
        np.save(out / f"zarr_region_{i}.npy", mosaic)
        report["regions"].append({"crs": crs, "transform": list(transform)[:6]})
    if "export_bbox" in request:
        export = out / "zarr_export"
        args = ["download", "--source", "zarr", "--store-url", str(store), "--year", str(year),
                "--bbox", ",".join(str(float(v)) for v in request["export_bbox"]), "--output", str(export)]
        try:
            code = app(args, standalone_mode=False)  # an error it has printed: typer.Exit(1), returned
        except SystemExit as exit:
            code = exit.code
        report["export_exit"] = code or 0
        report["exported"] = sorted(p.name for p in export.glob("*.tif"))
    return report


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} RESULTS_DIR OUT_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
