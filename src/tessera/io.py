"""Atomic writes: a killed run never leaves an output that looks complete."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` only if the block succeeds.

    The temporary path lives in the same directory (same filesystem, so the rename is atomic) and
    keeps the final suffix so that format-sniffing writers (GDAL, numpy, zarr) behave. On error the
    temporary file or directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(final: str | os.PathLike) -> None:
    """Remove what a killed writer of ``final`` left behind (SIGKILL skips every cleanup).

    Called when ``final`` is about to be written again, so nothing is removed that a live writer
    still uses: one output has one writer at a time.
    """
    final = Path(final)
    for stale in final.parent.glob(f".{glob.escape(final.stem)}.*.tmp{glob.escape(final.suffix)}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree (a Zarr store); nothing if it is gone already."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_raster_complete(path: str | os.PathLike) -> None:
    """Read back every block of a raster GDAL has just written; OSError if it is not whole.

    GDAL reports a write that fails while a dataset is being closed (a full disk, an exceeded quota)
    only as a message, and rasterio raises nothing: without this check a truncated file would be
    renamed into place as if complete. Call it on the temporary path, inside ``atomic_path``.
    """
    import rasterio
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            for _, window in src.block_windows(1):
                src.read(window=window)
    except (RasterioError, CPLE_BaseError) as exc:
        raise OSError(f"{path} was not written whole ({exc}): check the free space and quota of its disk, then rerun") from None


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be gigabytes)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
