"""tessera.publish.verify on a sound synthetic output directory and on each kind of damage.

``build_output_dir`` (also used by the other test_export_* files) makes a small but real output
directory with our own export code: ROI masks on the tile grid, patch embeddings, assemble_tile,
write_tile_cog, write_manifests and write_metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shapely import box

from tessera.assemble import quantise_tile, write_tile_cog
from tessera.layout import Results, TileFiles, find_tiles
from tessera.errors import UserError
from tessera.publish.manifest import processing_record, write_landmasks, write_manifests, write_metadata
from tessera.stack import Preprocessing
from tessera.publish.verify import verify_output
from tessera.grid import Tile, patch_name, tiles_for_geometry
from tessera.layout import write_patch_embedding
from tessera.plan import plan_tiles
from tessera.roi import read_roi_mask, write_roi_mask

YEAR = 2024
# Three tiles: two neighbours in UTM zone 31 and one across the 6° E edge in zone 32.
ROI = box(5.885, 52.035, 6.015, 52.075)
DIMS = 16


def synthetic_embedding(tile: Tile, window, roi_inside: np.ndarray, dims: int = DIMS) -> np.ndarray:
    """float32 (h, w, dims): smooth fields of the pixel's easting/northing, NaN outside the ROI and in a
    'never seen' hole (as inference writes pixels with no valid observation)."""
    rng = np.random.default_rng(7)  # the same fields for every tile, so neighbours look continuous
    frequencies = rng.uniform(-1 / 2000, 1 / 2000, size=(2, dims))
    phases = rng.uniform(0, 2 * np.pi, size=dims)
    transform = tile.window_transform(window)
    cols, rows = np.meshgrid(np.arange(window.width) + 0.5, np.arange(window.height) + 0.5)
    east, north = transform @ (cols, rows)
    east, north = east - 600_000, north - 5_770_000  # keep the phase arguments small
    fields = 0.4 * np.sin(2 * np.pi * (east[..., None] * frequencies[0] + north[..., None] * frequencies[1]) + phases)
    embedding = fields.astype(np.float32)
    hole = (cols - window.width * 0.3) ** 2 + (rows - window.height * 0.5) ** 2 < (min(window.width, window.height) * 0.12) ** 2
    embedding[hole | ~roi_inside] = np.nan
    return embedding


def build_output_dir(root: Path, *, cogs: bool = True, roi=ROI, year: int = YEAR, dims: int = DIMS) -> Path:
    """A sound output directory for ``roi`` (tiles made with our export code); returns its path."""
    out = root / "results"
    work = root / "work"
    checkpoint = root / "demo-checkpoint.pt"
    checkpoint.write_bytes(b"not a real checkpoint")
    embeddings = []
    for planned in plan_tiles(roi, patch_size=4096):
        tile, window = planned.tile, planned.window
        roi_mask = write_roi_mask(roi, tile, work / tile.name / "roi.tif")
        patch = work / tile.name / "patches" / f"{patch_name(window)}.npz"
        write_patch_embedding(patch, synthetic_embedding(tile, window, read_roi_mask(roi_mask, window), dims))
        files = TileFiles.locate(Results(out), tile, year)
        quantise_tile(tile.name, [patch], family="v2", embedding_path=files.embedding, scales_path=files.scales,
                      checksums_path=files.checksums)
        write_landmasks([files], {tile.name: roi_mask})
        if cogs:
            write_tile_cog(files.embedding, files.scales, roi_mask, Results(out).cog(tile.name, year),
                           tags={"TESSERA_YEAR": str(year)})
        embeddings.append(files.embedding)
    tiles = find_tiles(Results(out))
    write_manifests(Results(out), tiles, family="v2", variant="local")
    preprocessing = {files.tile.name: Preprocessing.expected_by("v2", "mpc").attrs() for files in tiles}
    processing = processing_record("v2", preprocessing, {"device": "cpu", "precision": "auto", "seed": 0,
                                                         "repeat_times": 1})
    write_metadata(Results(out), family="v2", variant="local", checkpoint=checkpoint, source="demo",
                   tiles=tiles, processing=processing)
    return out


_BUILT: dict[tuple, Path] = {}


def copy_of_output_dir(tmp_path_factory, destination: Path, **options) -> Path:
    """A private copy of the output directory ``build_output_dir(**options)``, built once per session.

    COGs dominate the build time; test modules that each need a directory with COGs share one build
    and may add files to their copy freely.
    """
    key = tuple(sorted(options.items()))
    if key not in _BUILT:
        _BUILT[key] = build_output_dir(tmp_path_factory.mktemp("pristine"), **options)
    return Path(shutil.copytree(_BUILT[key], destination))


@pytest.fixture(scope="module")
def sound_dir(tmp_path_factory) -> Path:
    return build_output_dir(tmp_path_factory.mktemp("verify"), cogs=False)


@pytest.fixture
def damaged_dir(sound_dir, tmp_path) -> Path:
    """A private copy of the sound directory that a test may damage."""
    return Path(shutil.copytree(sound_dir, tmp_path / "results"))


def _tile(output_dir: Path, name: str = "grid_5.95_52.05") -> TileFiles:
    return TileFiles.locate(Results(output_dir), Tile.from_name(name), YEAR)


def test_sound_directory_passes(sound_dir):
    assert verify_output(sound_dir) == []
    assert [t.name for t, _ in tiles_for_geometry(ROI)] == ["grid_5.85_52.05", "grid_5.95_52.05", "grid_6.05_52.05"]


def test_missing_scales_is_named(damaged_dir):
    files = _tile(damaged_dir)
    files.scales.unlink()
    problems = verify_output(damaged_dir)
    assert any("2024/grid_5.95_52.05: scales file" in p and "missing" in p for p in problems), problems
    # The manifest still lists the tile, whose files are now incomplete.
    assert any("manifest.parquet lists 2024/grid_5.95_52.05" in p for p in problems), problems


def test_truncated_npy_is_named(damaged_dir):
    files = _tile(damaged_dir)
    data = files.embedding.read_bytes()
    files.embedding.write_bytes(data[: len(data) // 2])
    problems = verify_output(damaged_dir)
    assert problems and all("grid_5.95_52.05" in p for p in problems), problems
    assert any("cannot read the .npy files" in p for p in problems), problems


def test_flipped_bytes_fail_the_checksum(damaged_dir):
    files = _tile(damaged_dir)
    data = bytearray(files.embedding.read_bytes())
    data[-1] ^= 0xFF  # same size and header: only the checksum can tell
    files.embedding.write_bytes(bytes(data))
    assert verify_output(damaged_dir) == [
        f"2024/grid_5.95_52.05: {files.embedding.name} does not match its SHA256 (corrupted or changed)"
    ]


def test_scale_of_one_is_named(damaged_dir):
    files = _tile(damaged_dir)
    scales = np.load(files.scales)
    row, col = np.argwhere(np.isfinite(scales))[0]
    scales[row, col] = 1.0
    np.save(files.scales, scales)
    problems = verify_output(damaged_dir)
    assert any("2024/grid_5.95_52.05: 1 scales outside (0, 1), e.g. 1" in p for p in problems), problems


def test_manifest_row_without_files_is_named(damaged_dir):
    files = _tile(damaged_dir, "grid_6.05_52.05")
    shutil.rmtree(files.embedding.parent)
    files.landmask.unlink()
    problems = verify_output(damaged_dir)
    assert problems == ["manifest.parquet lists 2024/grid_6.05_52.05 but its files are not all present"]
    assert len(pq.read_table(damaged_dir / "manifest.parquet")) == 3


def test_tile_missing_from_manifest_is_named(damaged_dir):
    table = pq.read_table(damaged_dir / "manifest.parquet")
    pq.write_table(table.filter(np.asarray(table["lon"]) != 5.85), damaged_dir / "manifest.parquet")
    assert verify_output(damaged_dir) == [
        "2024/grid_5.85_52.05: present but not in manifest.parquet (rerun the publish rule)"
    ]


def test_verify_reports_the_choices_that_changed_the_numbers(damaged_dir, capsys):
    from tessera.cli import main

    assert main(["verify", str(damaged_dir)]) == 0
    printed = capsys.readouterr().out
    assert ("made with: preprocessing s2_resampling bilinear, harmonisation mpc, s1_layover kept, "
            "granule_order datetime, then search order: as the family was trained") in printed
    assert "made with: inference device cpu, precision auto, seed 0, repeat_times 1, precision_in_effect fp32" in printed
    # An output directory that does not say how it was made is a problem.
    metadata = Results(damaged_dir).metadata
    sidecar = json.loads(metadata.read_text())
    del sidecar["processing"]
    metadata.write_text(json.dumps(sidecar))
    assert any("key 'processing' is missing" in p for p in verify_output(damaged_dir))


def test_processing_record_refuses_tiles_prepared_differently():
    nearest = Preprocessing.expected_by("v1.0", "mpc").attrs()
    bilinear = Preprocessing.expected_by("v2", "mpc").attrs()
    run = {"device": "auto", "precision": "auto", "seed": 0, "repeat_times": 1}
    record = processing_record("v1.0", {"a": nearest}, run)
    assert record["preprocessing_as_trained"] and record["inference"]["precision_in_effect"] == "fp32"
    assert not processing_record("v1.0", {"a": bilinear}, run)["preprocessing_as_trained"]
    assert processing_record("v1.1", {"a": nearest}, run)["inference"]["precision_in_effect"].startswith("bf16 on CUDA")
    with pytest.raises(UserError, match="different preprocessing"):
        processing_record("v1.0", {"a": nearest, "b": bilinear}, run)
