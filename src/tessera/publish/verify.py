"""`tessera verify OUTPUT_DIR`: check an output directory the way geotessera and users rely on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import rasterio

from tessera.layout import EMBEDDINGS_DIR, Results, TileFiles, find_tiles
from tessera.grid import Tile
from tessera.io import sha256_file
from tessera.period import ALL_ORBITS, WHOLE_YEAR, Period, describe


def _check_tile(files: TileFiles) -> list[str]:
    name, problems = f"{files.year}/{files.tile.name}", []
    for label, path in [("embedding", files.embedding), ("scales", files.scales), ("landmask", files.landmask)]:
        if not path.exists():
            problems.append(f"{name}: {label} file {path} is missing")
    if problems:
        return problems
    try:
        codes = np.load(files.embedding, mmap_mode="r")
        scales = np.load(files.scales)
    except (ValueError, OSError, EOFError) as error:
        return [f"{name}: cannot read the .npy files ({error})"]
    tile = files.tile
    if codes.dtype != np.int8 or codes.ndim != 3 or not codes.flags.c_contiguous:
        problems.append(f"{name}: embedding is {codes.dtype} {codes.shape}, expected C-ordered int8 (H, W, D)")
    if scales.dtype != np.float32 or scales.shape != codes.shape[:2]:
        problems.append(f"{name}: scales are {scales.dtype} {scales.shape}, expected float32 {codes.shape[:2]}")
    if codes.shape[:2] != (tile.height, tile.width):
        problems.append(f"{name}: embedding is {codes.shape[:2]} pixels, the tile grid is {(tile.height, tile.width)}")
    with rasterio.open(files.landmask) as landmask:
        if landmask.crs is None or landmask.crs.to_epsg() != tile.epsg or not landmask.transform.almost_equals(tile.transform):
            problems.append(f"{name}: landmask is not on the tile grid (EPSG:{tile.epsg}, {tile.transform[:6]})")
        inside = landmask.read(1) > 0 if (landmask.height, landmask.width) == scales.shape else None
    finite = np.isfinite(scales)
    if ((scales[finite] <= 0) | (scales[finite] >= 1)).any():
        bad = scales[finite][(scales[finite] <= 0) | (scales[finite] >= 1)]
        problems.append(f"{name}: {bad.size} scales outside (0, 1), e.g. {bad.flat[0]:g}: the tile is corrupt, rerun it")
    if inside is not None and finite[~inside].any():
        problems.append(f"{name}: {int(finite[~inside].sum())} pixels have a scale but the landmask says no embedding")
    if files.checksums.exists():
        for line in files.checksums.read_text().splitlines():
            digest, filename = line.split()
            target = files.embedding.parent / filename
            if target.exists() and sha256_file(target) != digest:
                problems.append(f"{name}: {filename} does not match its SHA256 (corrupted or changed)")
    else:
        problems.append(f"{name}: SHA256 file is missing")
    return problems


def describe_processing(output_dir: Path) -> list[str]:
    """The choices that changed the numbers of an output directory's embeddings, one line each
    (from tessera_metadata.json; empty when it records none)."""
    try:
        sidecar = json.loads(Results(output_dir).metadata.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    processing = sidecar.get("processing")
    if not isinstance(processing, dict):
        return []
    lines = [f"model family {sidecar.get('model_family')}, checkpoint sha256 {sidecar.get('checkpoint_sha256')}, "
             f"data source {sidecar.get('data_source')}"]
    pre = dict(processing.get("preprocessing", {}))
    period, orbits = Period.parse(pre.pop("period", str(WHOLE_YEAR))), pre.pop("s1_orbit_state", ALL_ORBITS)
    trained = "as the family was trained" if processing.get("preprocessing_as_trained") else \
        "NOT as the family was trained (allowed by model.allow_preprocessing_mismatch)"
    lines.append("preprocessing " + ", ".join(f"{key} {value}" for key, value in pre.items()) + f": {trained}")
    if (period, orbits) != (WHOLE_YEAR, ALL_ORBITS):
        lines.append(f"time series of {describe(period, orbits)} (dataset variant {sidecar.get('dataset_variant')}; "
                     "the checkpoints were trained on whole years of both orbit directions)")
    run = processing.get("inference", {})
    lines.append("inference " + ", ".join(f"{key} {value}" for key, value in run.items()))
    return lines


def skipped_scenes(output_dir: Path, work_dir: Path) -> list[str]:
    """One line per tile of ``output_dir`` whose fetch skipped scenes (from the work folder's
    ``stack.json``): the scenes, and why. Information, not problems: a tile that skipped too many
    already failed its fetch (``fetch.max_skipped_pct``)."""
    from tessera.layout import WorkTile

    lines = []
    for files in find_tiles(Results(output_dir)):
        index = WorkTile.at(work_dir, files.year, files.tile.name).stack_index
        if not index.exists():
            continue
        try:
            described = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError):
            lines.append(f"{files.year}/{files.tile.name}: {index} is unreadable; skipped scenes unknown")
            continue
        for sensor in ("s2", "s1"):
            skipped = described.get(sensor, {}).get("skipped") or {}
            if skipped:
                reasons = "; ".join(f"{scene}: {reason}" for scene, reason in sorted(skipped.items()))
                lines.append(f"{files.year}/{files.tile.name}: {len(skipped)} {sensor.upper()} scene(s) skipped ({reasons})")
    return lines


def verify_output(output_dir: Path) -> list[str]:
    """Every problem found, one line each; empty when the directory is sound."""
    results = Results(output_dir)
    problems = []
    if not (output_dir / EMBEDDINGS_DIR).is_dir():
        return [f"{output_dir}: no {EMBEDDINGS_DIR}/ folder: not a tessera-workflow output directory"]
    metadata = results.metadata
    try:
        sidecar = json.loads(metadata.read_text())
        for key in ("dataset_version", "dataset_variant", "checkpoint_sha256", "processing"):
            if key not in sidecar:
                problems.append(f"{metadata}: key {key!r} is missing")
    except (OSError, json.JSONDecodeError) as error:
        problems.append(f"{metadata}: unreadable ({error})")
    tiles = find_tiles(results)
    for files in tiles:
        problems += _check_tile(files)
    manifest = results.manifest
    if not manifest.exists():
        problems.append(f"{manifest}: missing")
        return problems
    rows = pq.read_table(manifest, columns=["year", "lon", "lat"]).to_pylist()
    listed = set()
    for row in rows:
        tile = Tile.from_name(f"grid_{row['lon']:.2f}_{row['lat']:.2f}")
        listed.add((row["year"], tile.name))
        if not TileFiles.locate(results, tile, row["year"]).present:
            problems.append(f"manifest.parquet lists {row['year']}/{tile.name} but its files are not all present")
    for files in tiles:
        if files.present and (files.year, files.tile.name) not in listed:
            problems.append(f"{files.year}/{files.tile.name}: present but not in manifest.parquet (rerun the publish rule)")
    return problems
