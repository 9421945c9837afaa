"""``tessera check-source``: does the configured source work, for one tile, in about a minute?

It reports which credentials it found (their kind, never their value), searches each sensor for the
tile-year, reads one block of every asset kind of one scene per sensor, and prints what works, the
latency, the scenes per tile-year and the bytes a fetch of the tile-year would read. Each failure
is one line naming what failed and how to fix it; any failure makes the command exit non-zero.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from tessera.errors import SourceUnavailable, UserError
from tessera.grid import Tile
from tessera.period import DateRange
from tessera.sources.stac import S1_MASK, S1_POLARISATIONS, S2_BANDS, S2_SCL, Source, redact

# The block read per asset: this many pixels square, at the centre of the work window.
BLOCK_PIXELS = 64


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    scenes: dict[str, int] = field(default_factory=dict)
    bytes_per_tile_year: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def credentials_found(source: Source) -> str:
    """What the source will authenticate with: a kind and where it comes from, never a value."""
    from tessera.sources.mpc import PlanetaryComputerSigner
    from tessera.sources.opera import OperaFeed

    kinds = []
    for feed in (source.s2, source.s1):
        if isinstance(feed, OperaFeed):
            from tessera.sources import earthdata

            found = earthdata.credentials_kind()
            kinds.append(f"Earthdata Login: {found}" if found else "Earthdata Login: none found")
        elif isinstance(getattr(feed, "signer", None), PlanetaryComputerSigner):
            key = " (and PC_SDK_SUBSCRIPTION_KEY, not needed)" if os.environ.get("PC_SDK_SUBSCRIPTION_KEY") else ""
            kinds.append(f"Planetary Computer: anonymous SAS tokens{key}")
    kinds = list(dict.fromkeys(kinds))
    return "; ".join(kinds) if kinds else "none needed"


def check_source(source: Source, tile: Tile, window: Window, year: int, *, file=None) -> CheckReport:
    """Run the checks and print one line each to ``file`` (stdout)."""
    from tessera.fetch import S2_MAX_CLOUD_PCT, window_bbox_lonlat
    from tessera.fetch.reader import WindowReader

    file = sys.stdout if file is None else file
    report = CheckReport()

    def say(line: str) -> None:
        report.lines.append(line)
        print(line, file=file, flush=True)

    def fail(what: str, exc: BaseException) -> None:
        if isinstance(exc, SourceUnavailable):
            message = f"{exc}: the service is down or throttling; try again later"
        elif isinstance(exc, UserError):
            message = str(exc)
        else:
            message = f"{redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}: check the network and the source"
        line = f"FAILED {what}: {message}"
        report.failures.append(line)
        say(line)

    say(f"source {source.name}, tile {tile.name}, year {year}")
    say(f"credentials: {credentials_found(source)}")
    bbox = window_bbox_lonlat(tile, window)
    block = _centre_block(window)
    pixels = int(window.width) * int(window.height)
    sensors = (("S2", source.s2, (*S2_BANDS, S2_SCL)),
               ("S1", source.s1, (*S1_POLARISATIONS, *([S1_MASK] if S1_MASK in source.s1.asset_keys else []))))
    for sensor, feed, bands in sensors:
        started = time.monotonic()
        try:
            feed.read_options()  # credentials first: missing or refused ones are one clear line
            items = feed.search(bbox, DateRange.whole_year(year))
        except (UserError, SourceUnavailable, OSError, ValueError) as exc:
            fail(f"{sensor} search at {feed.url}", exc)
            continue
        if sensor == "S2":
            items = [item for item in items if item.properties.get("eo:cloud_cover", 0.0) < S2_MAX_CLOUD_PCT]
        report.scenes[sensor] = len(items)
        say(f"{sensor} search  ok  {len(items)} scenes in {year} ({_ms(started)})")
        if not items:
            fail(f"{sensor} search", UserError(f"no {sensor} scene covers {tile.name} in {year}: check the tile, "
                                               "the year and the source's collections"))
            continue
        item = max(items, key=lambda i: (i.datetime or i.common_metadata.start_datetime, i.id))
        reader = WindowReader(tile, block, feed, parallel_reads=4)
        started = time.monotonic()
        per_scene = 0
        read_failed = False
        from tessera.fetch.reader import SceneUnreadable

        for band in bands:
            try:
                _, in_scene = reader.read(item, band, Resampling.nearest)
                per_scene += _asset_bytes(feed, item, band, reader, pixels)
            except SceneUnreadable as exc:
                fail(f"{sensor} read of {band}", UserError(
                    f"{'; '.join(exc.failures.values())} ({item.id}): the source lists an asset it cannot serve; "
                    "if every scene fails, check the source's asset mapping (stac: assets)"))
                read_failed = True
                break
            except (UserError, SourceUnavailable, OSError) as exc:
                fail(f"{sensor} read of {band}", exc)
                read_failed = True
                break
            if not in_scene.any():
                say(f"  note: the {band} block of {item.id} holds no data (outside the scene's footprint)")
        if read_failed:
            continue
        report.bytes_per_tile_year[sensor] = per_scene * len(items)
        say(f"{sensor} read    ok  {len(bands)} assets of {item.id}, one {block.width}x{block.height} block each "
            f"({_ms(started)})")
    for sensor, total in report.bytes_per_tile_year.items():
        say(f"estimate: {sensor} {report.scenes[sensor]} scenes, ~{total / 1e9:.2f} GB read per tile-year "
            "(work-window reads at native resolution, before compression)")
    say("all checks passed" if report.ok else f"{len(report.failures)} check(s) failed")
    return report


def _ms(started: float) -> str:
    return f"{1000 * (time.monotonic() - started):,.0f} ms"


def _centre_block(window: Window) -> Window:
    width, height = min(BLOCK_PIXELS, int(window.width)), min(BLOCK_PIXELS, int(window.height))
    col = int(window.col_off) + (int(window.width) - width) // 2
    row = int(window.row_off) + (int(window.height) - height) // 2
    return Window(col, row, width, height)


def _asset_bytes(feed, item, band: str, reader, window_pixels: int) -> int:
    """Bytes of the work window in the asset's own resolution and data type (uncompressed)."""
    try:
        href = feed.href(item, band)
        with rasterio.Env(**reader.options), rasterio.open(href) as src:
            resolution = abs(src.transform.a)
            itemsize = np.dtype(src.dtypes[0]).itemsize
    except Exception:  # noqa: BLE001 - an estimate only; the read itself succeeded
        return 0
    return int(window_pixels * (10.0 / resolution) ** 2 * itemsize) if resolution > 0 else 0
