"""Window reads of scene assets onto a tile's work-window grid, with GDAL's HTTP options and retries.

Each scene is read window-only through a rasterio ``WarpedVRT`` onto the exact work-window grid
(tile CRS, window transform and size), so our data carry no sub-pixel shift (the reference's
stackstac snapping does, UPSTREAM.md §1.2). Reads run a few at a time (``PARALLEL_READS``); each
signs its href anew (MPC SAS tokens expire), and a read that fails is retried as
``WindowReader.read`` explains; a scene that still cannot be read is a ``SceneUnreadable``.
"""


from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import pystac
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from tessera.errors import SourceUnavailable
from tessera.grid import Tile
from tessera.sources import UnusableAsset, redact
from tessera.sources.stac import Feed, RedactingFilter

# GDAL over HTTP: no directory listing on open (a COG is one file), consecutive ranges merged into
# one request, timeouts that curl enforces on every request (the reference's SIGALRM timeouts do
# nothing in worker threads, UPSTREAM.md §10.2), and GDAL's own retries of transient errors (429,
# 5xx, dropped connections) with exponentially growing, jittered delays.
GDAL_HTTP_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # Ranges are rounded to this granularity (default 16 KB): on small COGs that fetches overviews
    # and neighbouring blocks for nothing (demo tiles: 1.47x the intersecting blocks' bytes at
    # 16 KB, 1.12x at 1 KB, benchmarks/fetch.py); on a 5490 px COG with 512 px blocks a tile
    # window took 3 requests and 1.008x at either size.
    "CPL_VSIL_CURL_CHUNK_SIZE": "1024",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
}
# Attempts of a read (each after GDAL's own retries), and the first wait after a transient failure.
READ_ATTEMPTS = 4
TRANSIENT_BACKOFF_S = 5.0
# What a failed read's message says: the scene is gone, the provider refuses it, or the network or
# the service failed (curl's errors and the HTTP statuses GDAL retries).
_GONE_STATUSES = {"404", "410"}
_REFUSED_STATUSES = {"401", "403"}
_TRANSIENT_MARKERS = ("timed out", "timeout", "curl error", "connection reset", "couldn't connect", "could not connect",
                      "recv failure", "send failure", "connection refused", "empty reply", "ssl", "resolve host")
_HTTP_STATUS = re.compile(r"HTTP response code: (\d+)")
# GDAL errors and libtiff warnings that mean a read got fewer or other bytes than the file holds.
_HIDDEN_READ_FAILURE = re.compile(r"GDAL signalled an error: err_no=(?!11\b)|IO error during reading")
# Band reads in flight per tile: reads wait on the network, not the CPU, and a date needs up to
# 11 assets of each of its granules.
PARALLEL_READS = 4
# rasterio's loggers that pass on GDAL's messages (its retry warnings name the full, signed URL).
_GDAL_LOGGERS = ("rasterio._env", "rasterio._err", "rasterio._base", "rasterio._io", "rasterio._warp", "rasterio.vrt")


class SceneUnreadable(Exception):
    """Items that could not be read, with why; the fetch records them and goes on without them."""

    def __init__(self, failures: dict[str, str]):
        super().__init__("; ".join(f"{item_id}: {reason}" for item_id, reason in failures.items()))
        self.failures = failures



class WindowReader:
    """Reads bands of items onto the work-window grid, a few at a time."""

    def __init__(self, tile: Tile, window: Window, feed: Feed, parallel_reads: int):
        self.crs = f"EPSG:{tile.epsg}"
        self.transform = tile.window_transform(window)
        self.height, self.width = int(window.height), int(window.width)
        self.feed = feed
        # Credentials are looked up once, up front: a missing one is the user's to fix, not a scene failure.
        self.options = {**GDAL_HTTP_OPTIONS, **feed.read_options()}
        self.parallel_reads = parallel_reads
        self.gdal_messages = GdalMessages()

    def read(self, item: pystac.Item, band: str, resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
        """``(values, valid)``, both (H, W): the values in the asset's own data type, and where the
        scene has data (inside its footprint, not its nodata).

        Failures are told apart by what they say about the scene:

        * permanent, the scene is skipped (``SceneUnreadable``): the asset is gone (404/410) or
          unusable; the provider refuses it (401/403) even after signing or resolving it anew; the
          file does not decode after ``READ_ATTEMPTS`` fresh reads (bypassing GDAL's cache, which
          would repeat the failure without a request);
        * transient, the tile fails (``SourceUnavailable``): throttling, server errors, timeouts,
          refused or reset connections that outlast GDAL's own retries and ours (``READ_ATTEMPTS``,
          with ``TRANSIENT_BACKOFF_S`` doubling between them). Skipping would make the tile lose
          dates for good because of an outage; failing lets a rerun finish it.

        An expired SAS token or presigned URL shows as HTTP 403, or, when it expires between the
        requests of one open, as a file GDAL cannot recognise: both are signed anew first.
        """
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                href = self.feed.href(item, band)
            except UnusableAsset as exc:
                raise SceneUnreadable({item.id: str(exc)}) from None
            try:
                return self._warped(href, resampling, cached=attempt == 1)
            except RasterioError as exc:
                reason = _one_line(exc)
                kind = failure_kind(reason)
                last = attempt == READ_ATTEMPTS
                if kind == "gone":
                    raise SceneUnreadable({item.id: f"{band}: {redact(reason)}"}) from None
                if kind == "refused":
                    if not self.feed.forget(href) or last:
                        raise SceneUnreadable({item.id: f"{band}: refused after signing anew: {redact(reason)}"}) from None
                    continue
                if kind == "transient":
                    if last:
                        raise SourceUnavailable(f"reading {item.id} {band} failed {READ_ATTEMPTS} times, each after "
                                                f"GDAL's retries ({redact(reason)})") from None
                    self.feed.forget(href)
                    time.sleep(TRANSIENT_BACKOFF_S * 2 ** (attempt - 1))
                    continue
                # Undecodable: a body cut short, or an expired signature mid-open; sign anew, read fresh.
                self.feed.forget(href)
                if last:
                    raise SceneUnreadable({item.id: f"{band}: {redact(reason)}"}) from None
        raise AssertionError("unreachable")

    def _warped(self, href: str, resampling: Resampling, *, cached: bool) -> tuple[np.ndarray, np.ndarray]:
        options = self.options
        if not cached:
            # GDAL splits this option's list of path prefixes on ":", so a URL cannot be named:
            # "/vsicurl/https" leaves every https file of this read uncached.
            options = {**options, "CPL_VSIL_CURL_NON_CACHED": "/vsicurl/" + href.split(":", 1)[0]}
        self.gdal_messages.take()  # left by an earlier read of this thread that raised
        with rasterio.Env(**options), rasterio.open(href) as src:
            warped = warp_onto(src, self.crs, self.transform, self.width, self.height, resampling)
        hidden = self.gdal_messages.take()
        if hidden:
            raise RasterioError(f"the read returned data but GDAL reported: {hidden[0]}")
        return warped

    def read_all(self, reads: list[tuple[pystac.Item, str, Resampling]]
                 ) -> Iterator[tuple[tuple, tuple[np.ndarray, np.ndarray]]]:
        """``((item, band, resampling), (values, valid))`` for each read as it completes. Then, if any read
        failed, SceneUnreadable naming every failed item with its own reason (reads of the batch
        still running are waited for rather than dropped: a later open of a failed URL would only
        say that the file does not exist)."""
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(self.parallel_reads, thread_name_prefix="read") as pool:
            futures = {pool.submit(self.read, *read): read for read in reads}
            try:
                for future in as_completed(futures):
                    try:
                        data = future.result()
                    except SceneUnreadable as failure:
                        for item_id, reason in failure.failures.items():
                            failures.setdefault(item_id, reason)
                        continue
                    if not failures:  # the batch is rebuilt without the failed items anyway
                        yield futures[future], data
            except BaseException:
                for future in futures:  # the tile fails: reads not started yet are not made
                    future.cancel()
                raise
        if failures:
            raise SceneUnreadable(failures)


def warp_onto(src: rasterio.io.DatasetReader, crs: str, transform, width: int, height: int,
              resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """``(values, valid)`` of band 1 of ``src`` warped onto a grid, in the source's data type.

    The warp runs in the source's data type, as the reference's (stackstac) does: an integer band
    is interpolated and rounded by GDAL before we see floats. One warp gives both the values and
    where they are valid: reading the mask band after the values (rasterio's masked read) warps the
    source a second time.
    """
    # Without a nodata value, an alpha band is what marks pixels outside the scene.
    with WarpedVRT(src, crs=crs, transform=transform, width=width, height=height, resampling=resampling,
                   add_alpha=src.nodata is None) as vrt:
        if src.nodata is None:
            data, alpha = vrt.read([1, vrt.count])
            return data, alpha != 0
        data = vrt.read(1)
        return data, ~nodata_mask(data, vrt.nodata)


def nodata_mask(data: np.ndarray, nodata: float) -> np.ndarray:
    """True where ``data`` holds ``nodata``, as GDAL's nodata mask band decides it: NaN for a NaN
    nodata, equality for integers, and for other floats equality within 2 float32 ULPs
    (``ARE_REAL_EQUAL`` in gdal_priv.h), computed in the data's type."""
    if not np.issubdtype(data.dtype, np.floating):
        return data == nodata
    if np.isnan(nodata):
        return np.isnan(data)
    nodata = data.dtype.type(nodata)
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(data - nodata) < np.finfo(np.float32).eps * np.abs(data + nodata) * 2
    return (data == nodata) | close


def failure_kind(reason: str) -> str:
    """``gone``, ``refused``, ``transient`` or ``undecodable`` for a failed read's message."""
    status = _HTTP_STATUS.search(reason)
    if status is not None:
        code = status.group(1)
        if code in _GONE_STATUSES:
            return "gone"
        if code in _REFUSED_STATUSES:
            return "refused"
        return "transient"  # 429, 5xx, and anything else a server says instead of the bytes
    lowered = reason.lower()
    if any(marker in lowered for marker in _TRANSIENT_MARKERS):
        return "transient"
    return "undecodable"


def _one_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = f"{exc} ({cause})" if cause is not None and "previous exception" in str(exc) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


class GdalMessages(RedactingFilter):
    """Watches GDAL's messages during a fetch: keeps credentials out of them and records, per
    thread, the failures that a read which returns data hides.

    GDAL's warper does not always pass on a failed source block: a range response cut short can
    leave a TIFF tile undecodable ("TIFFReadEncodedTile() failed") or a header tag unread ("IO error
    during reading of GeoKeyDirectory; tag ignored") while the read returns zeros. rasterio logs
    such errors (at INFO, as "GDAL signalled an error") rather than raising when the call as a whole
    succeeds, from the thread that made the call. HTTP errors (err_no 11) are left out: GDAL retries
    those itself and a read that still fails raises.
    """

    def __init__(self):
        super().__init__()
        self._failures: dict[int, list[str]] = defaultdict(list)
        self._loggers = [logging.getLogger(name) for name in _GDAL_LOGGERS]

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        if _HIDDEN_READ_FAILURE.search(record.getMessage()):
            self._failures[record.thread].append(record.getMessage())
        # INFO records are made only for this watch; show them where they would have been shown.
        return record.levelno >= self._shown_level

    def take(self) -> list[str]:
        """The failures recorded in this thread since the last call."""
        return self._failures.pop(threading.get_ident(), [])

    def __enter__(self) -> GdalMessages:
        self._shown_level = logging.getLogger("rasterio").getEffectiveLevel()
        self._levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.addFilter(self)
            logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
        return self

    def __exit__(self, *exc) -> None:
        for logger, level in zip(self._loggers, self._levels):
            logger.removeFilter(self)
            logger.setLevel(level)

