"""Every on-disk contract between the stages, spelled once: where files live and what they hold.

The rules (``rules/*.smk``) and the Python code both take their paths from here, so a path is
written in one place. Path functions accept Snakemake wildcards (``"{tile}"``) as well as values.

Work directory (intermediates, per year and tile; docs/INTERNALS.md):
``{work}/{year}/{tile}/``: ``roi.tif``, ``search_{s2,s1}.json``, ``s2.zarr``, ``s1.zarr``,
``stack.json``, ``patches/r{row}_c{col}.npz``; the demo's ``{work}/demo/{year}/catalog.json`` and
``{work}/demo/checkpoint-{family}.pt``; ``{work}/tessera_time_series.json`` (as in the results).

Results (geotessera's layout and our exports; README "Outputs"): see :class:`Results`.

File formats owned here: the patch embedding (one float32 array in a CRC-checked ``.npz``) and the
reference per-patch layout (seven ``.npy`` arrays and ``roi.tiff``: one reader, one writer, one
checker).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tessera.errors import DamagedIntermediate, UserError
from tessera.grid import Tile
from tessera.io import atomic_path

# --- the work directory --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkTile:
    """The intermediates of one tile-year."""

    root: Path

    @classmethod
    def at(cls, work_dir: str | os.PathLike, year: int | str, tile: str) -> WorkTile:
        return cls(Path(work_dir) / str(year) / tile)

    @property
    def roi_mask(self) -> Path:
        """uint8 GeoTIFF on the whole tile grid, 1 = inside the ROI (also the tile's landmask)."""
        return self.root / "roi.tif"

    def search(self, sensor: str) -> Path:
        """The cached search of one sensor (``s2`` or ``s1``), reused by a rerun."""
        return self.root / f"search_{sensor}.json"

    @property
    def s2(self) -> Path:
        return self.root / "s2.zarr"

    @property
    def s1(self) -> Path:
        return self.root / "s1.zarr"

    @property
    def stack_index(self) -> Path:
        return self.root / "stack.json"

    @property
    def patches(self) -> Path:
        return self.root / "patches"

    def patch(self, name: str) -> Path:
        return self.patches / f"{name}{PATCH_SUFFIX}"


# In an output and a work directory: the kind of time series (period, S1 orbit directions) it holds,
# recorded by the first run into it (``tessera.period.claim_directories``).
TIME_SERIES_FILE = "tessera_time_series.json"


def demo_catalog(work_dir: str | os.PathLike, year: int | str) -> Path:
    """The demo source's STAC catalog of synthetic scenes for a year."""
    return Path(work_dir) / "demo" / str(year) / "catalog.json"


def demo_checkpoint(work_dir: str | os.PathLike, family: str) -> Path:
    return Path(work_dir) / "demo" / f"checkpoint-{family}.pt"


# --- results -------------------------------------------------------------------------------------

EMBEDDINGS_DIR = "global_0.1_degree_representation"
LANDMASKS_DIR = "global_0.1_degree_tiff_all"


@dataclass(frozen=True)
class Results:
    """The output directory: geotessera's layout, then our exports beside it."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # geotessera's layout
    @property
    def metadata(self) -> Path:
        return self.root / "tessera_metadata.json"

    @property
    def manifest(self) -> Path:
        """Tile manifest read by geotessera ≥ 0.9; ``registry`` is the same table for 0.6–0.8."""
        return self.root / "manifest.parquet"

    @property
    def registry(self) -> Path:
        return self.root / "registry.parquet"

    @property
    def landmasks_manifest(self) -> Path:
        return self.root / "landmasks.parquet"

    def tile_folder(self, tile: str, year: int | str) -> Path:
        return self.root / EMBEDDINGS_DIR / str(year) / tile

    def embedding(self, tile: str, year: int | str) -> Path:
        """int8 (H, W, D) codes, C order."""
        return self.tile_folder(tile, year) / f"{tile}.npy"

    @staticmethod
    def tile_year_of(embedding: Path) -> tuple[str, int]:
        """(tile name, year) of a path made by :meth:`embedding`."""
        folder = Path(embedding).parent
        if Path(embedding).name != f"{folder.name}.npy" or not folder.parent.name.isdigit():
            raise UserError(f"{embedding} is not an embedding in geotessera's layout (<year>/<tile>/<tile>.npy)")
        return folder.name, int(folder.parent.name)

    def scales(self, tile: str, year: int | str) -> Path:
        """float32 (H, W) per-pixel scales; NaN = no embedding."""
        return self.tile_folder(tile, year) / f"{tile}_scales.npy"

    def checksums(self, tile: str, year: int | str) -> Path:
        return self.tile_folder(tile, year) / "SHA256"

    def float32(self, tile: str, year: int | str) -> Path:
        return self.tile_folder(tile, year) / f"{tile}_float32.npy"

    def landmask(self, tile: str) -> Path:
        return self.root / LANDMASKS_DIR / f"{tile}.tiff"

    # our exports
    def cog(self, tile: str, year: int | str) -> Path:
        return self.root / "cog" / str(year) / f"{tile}_{year}.tif"

    def observations(self, tile: str, year: int | str) -> Path:
        return self.root / "observations" / str(year) / f"{tile}_{year}.tif"

    def quicklooks(self, year: int | str) -> Path:
        """A year's quicklook folder: ``pca.json`` and each tile's PNG and RGB COG."""
        return self.root / "quicklook" / str(year)

    def quicklook(self, tile: str, year: int | str) -> tuple[Path, Path]:
        """(PNG, RGB COG) of a tile's quicklook."""
        folder = self.quicklooks(year)
        return folder / f"{tile}_{year}.png", folder / f"{tile}_{year}.tif"

    def mosaic(self, layer: str, year: int | str, epsg: int | str, ext: str = "vrt") -> Path:
        """One UTM zone's mosaic of a layer (``tessera`` or ``quicklook``)."""
        return self.root / "mosaic" / str(year) / f"{layer}_{year}_epsg{epsg}.{ext}"

    @property
    def zarr_store(self) -> Path:
        """Every tile-year in one Zarr v3 store in the layout of geotessera's ``tessera.zarr``."""
        return self.root / "tessera.zarr"

    @property
    def stac(self) -> Path:
        return self.root / "stac"

    @property
    def stac_collection(self) -> Path:
        return self.stac / "collection.json"

    @property
    def report(self) -> Path:
        """The run's HTML report, every year of it."""
        return self.root / "report.html"

    def change(self, tile: str, first: int | str, second: int | str) -> tuple[Path, Path]:
        """(COG, PNG) of a tile's change map between two years: per-pixel cosine distance."""
        folder = self.root / "change" / f"{first}_{second}"
        return folder / f"{tile}_{first}_{second}.tif", folder / f"{tile}_{first}_{second}.png"


@dataclass(frozen=True)
class TileFiles:
    """A tile-year's files in geotessera's layout; complete when embedding, scales and landmask exist."""

    tile: Tile
    year: int
    embedding: Path
    scales: Path
    landmask: Path
    checksums: Path

    @classmethod
    def locate(cls, results: Results, tile: Tile, year: int) -> TileFiles:
        return cls(tile, year, results.embedding(tile.name, year), results.scales(tile.name, year),
                   results.landmask(tile.name), results.checksums(tile.name, year))

    @property
    def present(self) -> bool:
        return self.embedding.exists() and self.scales.exists() and self.landmask.exists()


def find_tiles(results: Results) -> list[TileFiles]:
    """Every tile-year folder of an output directory (present or not): for checking a directory
    whatever made it. The workflow's own stages are given their tiles instead."""
    found = []
    for folder in sorted((results.root / EMBEDDINGS_DIR).glob("[0-9][0-9][0-9][0-9]/grid_*")):
        found.append(TileFiles.locate(results, Tile.from_name(folder.name), int(folder.parent.name)))
    return found


# --- patch embeddings ----------------------------------------------------------------------------

# A patch embedding is one array in an .npz: the zip entry's CRC-32, which numpy's loader checks
# on every read, catches a damaged file that a bare .npy would load as wrong numbers.
PATCH_SUFFIX = ".npz"
_PATCH_ARRAY = "embedding"
_PATCH_NAME = re.compile(r"^r(\d+)_c(\d+)$")


def patch_name(window) -> str:
    """``r<row_off>_c<col_off>``: a patch's name, in tile pixel coordinates."""
    return f"r{window.row_off}_c{window.col_off}"


def patch_origin(path: Path) -> tuple[int, int]:
    """(row_off, col_off) of a patch file named r<row>_c<col>.npz."""
    match = _PATCH_NAME.match(path.stem)
    if not match or path.suffix != PATCH_SUFFIX:
        raise UserError(f"patch file {str(path)!r} is not named r<row>_c<col>{PATCH_SUFFIX}")
    return int(match.group(1)), int(match.group(2))


def patch_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Patch embedding files, given as files or as folders of them."""
    found = []
    for path in map(Path, paths):
        found += sorted(path.glob(f"r*_c*{PATCH_SUFFIX}")) if path.is_dir() else [path]
    return found


def write_patch_embedding(path: Path, embedding: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **{_PATCH_ARRAY: embedding})


def read_patch_embedding(path: Path) -> np.ndarray:
    """A patch embedding written by ``write_patch_embedding``; a damaged file is a DamagedIntermediate."""
    try:
        with np.load(path) as archive:
            return archive[_PATCH_ARRAY]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise DamagedIntermediate(path, str(error)) from None


# --- the reference per-patch layout --------------------------------------------------------------

# Array name -> dtype, each stored as <name>.npy (UPSTREAM.md §2). The names are also the keys of
# the arrays a model embeds (``tessera.models.engine``).
REFERENCE_ARRAYS = {
    "bands": np.uint16,  # (T, P, P, 10) in S2 band order B04 B02 B03 B08 B8A B05 B06 B07 B11 B12
    "masks": np.uint8,  # (T, P, P) 1 = valid
    "doys": np.uint16,  # (T,)
    "sar_ascending": np.int16,  # (Ta, P, P, 2) [VV, VH] codes, 0 = missing
    "sar_ascending_doy": np.int16,
    "sar_descending": np.int16,
    "sar_descending_doy": np.int16,
}
REFERENCE_ROI = "roi.tiff"
_S1_ORBIT_ARRAYS = ("sar_ascending", "sar_descending")


def reference_patch_name(col: int, row: int, width: int, height: int, size: int) -> str:
    """``<x_min>_<y_min>_<x_max>_<y_max>`` as the reference retiler names a patch of a
    ``width`` × ``height`` grid: columns and rows of its top-left pixel, then that plus ``size``,
    clipped to the grid."""
    return f"{col}_{row}_{min(col + size, width)}_{min(row + size, height)}"


def check_reference_arrays(arrays: Mapping[str, np.ndarray], where: str = "input arrays") -> tuple[int, int]:
    """(H, W) of arrays in the reference layout; missing arrays or inconsistent shapes raise a
    UserError naming the array."""
    missing = [name for name in REFERENCE_ARRAYS if name not in arrays]
    if missing:
        raise UserError(f"{where} lack {', '.join(missing)}: provide all of {', '.join(REFERENCE_ARRAYS)}")
    bands = arrays["bands"]
    if bands.ndim != 4 or bands.shape[-1] != 10:
        raise UserError(f"{where}: bands has shape {bands.shape}, expected (T, H, W, 10)")
    steps, height, width = bands.shape[:3]
    expected = {"masks": (steps, height, width), "doys": (steps,)}
    for orbit in _S1_ORBIT_ARRAYS:
        expected[orbit] = (len(arrays[f"{orbit}_doy"]), height, width, 2)
        expected[f"{orbit}_doy"] = (len(arrays[f"{orbit}_doy"]),)
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise UserError(f"{where}: {name} has shape {tuple(arrays[name].shape)}, expected {shape}: re-export the patch")
    return height, width


def read_reference_patch(patch_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a reference per-patch directory (ours or the reference's), memory-mapped.

    ``bands.npy`` and ``doys.npy`` are required; a missing ``masks.npy`` means every step is valid
    and missing SAR files mean no SAR observations (as the reference reads them). Dtypes and shapes
    are checked.
    """
    directory = Path(patch_dir)
    if not directory.is_dir():
        raise UserError(f"patch directory {str(directory)!r} does not exist: give a directory holding bands.npy")
    arrays = {}
    for name, dtype in REFERENCE_ARRAYS.items():
        path = directory / f"{name}.npy"
        if not path.exists():
            continue
        try:
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise UserError(f"{path} is not a readable .npy file ({error}): re-export the patch") from None
        if arrays[name].dtype != dtype:
            raise UserError(f"{path} is {arrays[name].dtype}, the reference layout needs {np.dtype(dtype).name}: "
                            "re-export the patch")
    for required in ("bands", "doys"):
        if required not in arrays:
            raise UserError(f"patch directory {str(directory)!r} has no {required}.npy: it is not in the reference "
                            "per-patch layout")
    steps, height, width = arrays["bands"].shape[:3]
    arrays.setdefault("masks", np.ones((steps, height, width), np.uint8))
    for orbit in _S1_ORBIT_ARRAYS:
        arrays.setdefault(orbit, np.zeros((0, height, width, 2), np.int16))
        arrays.setdefault(f"{orbit}_doy", np.zeros((0,), np.int16))
    check_reference_arrays(arrays, where=f"patch directory {str(directory)!r}")
    return arrays


def read_reference_roi(patch_dir: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray | None:
    """The boolean ROI mask of a reference patch directory (its ``roi.tiff``, > 0 inside), or None without one."""
    import rasterio

    path = Path(patch_dir) / REFERENCE_ROI
    if not path.exists():
        return None
    try:
        with rasterio.open(path) as src:
            mask = src.read(1) > 0
    except rasterio.errors.RasterioError as error:
        raise UserError(f"{path} is not a readable GeoTIFF ({error}): re-export the patch") from None
    if mask.shape != shape:
        raise UserError(f"{path} is {mask.shape[0]} x {mask.shape[1]} pixels but the patch arrays are "
                        f"{shape[0]} x {shape[1]}: re-export the patch")
    return mask


def write_reference_patch(out_dir: Path, arrays: Mapping[str, np.ndarray], roi: np.ndarray, *, crs, transform) -> Path:
    """Write one patch in the reference layout: the seven ``.npy`` arrays and ``roi.tiff`` (uint8 0/1,
    LZW, tiled 256, ``crs`` and ``transform``, no nodata tag, as the reference's ROI tiffs). The
    directory appears complete or not at all."""
    import rasterio

    check_reference_arrays(arrays, where=f"patch {out_dir}")
    with atomic_path(out_dir, directory=True) as staging:
        for name, dtype in REFERENCE_ARRAYS.items():
            np.save(staging / f"{name}.npy", np.asarray(arrays[name], dtype))
        profile = dict(driver="GTiff", width=roi.shape[1], height=roi.shape[0], count=1, dtype="uint8", crs=crs,
                       transform=transform, compress="lzw", tiled=True, blockxsize=256, blockysize=256)
        with rasterio.open(staging / REFERENCE_ROI, "w", **profile) as dst:
            dst.write(roi.astype(np.uint8), 1)
    return out_dir
