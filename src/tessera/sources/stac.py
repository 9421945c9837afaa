"""STAC-based data sources: band names, feeds (search, asset hrefs, signing), harmonisation, the
search cache, and keeping credentials out of messages.

A ``Source`` pairs a Sentinel-2 feed and a Sentinel-1 feed with the harmonisation rule the reference
applies to that source's S2 data. A feed finds one sensor's scenes for a bbox and dates (a year, or
its period: ``tessera.period.DateRange``) as pystac Items and says where each band of an item is
read from (``href``), signed at the moment of the read.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs

import numpy as np
import pystac
import pystac_client
import requests
import shapely
from pystac_client.stac_api_io import StacApiIO
from shapely.geometry import shape
from urllib3.util.retry import Retry

from tessera.errors import SourceUnavailable, UserError
from tessera.io import atomic_path
from tessera.period import DateRange

log = logging.getLogger(__name__)

# Our band names. S2_BANDS is the channel order of the reference bands.npy (not wavelength order).
S2_BANDS = ("B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12")
S2_SCL = "SCL"
S1_POLARISATIONS = ("vv", "vh")
# An optional per-item S1 layer of pixels to ignore (OPERA RTC-S1's layover/shadow mask).
S1_MASK = "mask"
BANDS = (*S2_BANDS, S2_SCL, *S1_POLARISATIONS)
S2_NEEDS = (*S2_BANDS, S2_SCL)

# "mpc": MPC's L2A items carry the +1000 DN BOA offset of processing baseline 04.00 and the
# reference removes it by acquisition date, only from values >= 1000 (UPSTREAM.md §1.3 step 7).
# The date only stands for the baseline: where an item states its ``s2:processing_baseline`` (MPC's
# do), that decides — the same as the date for MPC's items, except those the date rule gets wrong
# (acquired on 2022-01-25 under 04.00, or reprocessed to another baseline than their date implies),
# a data-path bug of the reference fixed here (README, differences).
# "none": raw DN as stored (the reference's rule for Earth Search, whose COGs had the offset removed).
HARMONISATION_RULES = ("mpc", "none")
MPC_OFFSET_FROM = dt.date(2022, 1, 25)  # strictly after this UTC date, for items without a baseline
MPC_OFFSET_BASELINE = (4, 0)  # processing baselines from 04.00 on add the offset
MPC_BOA_OFFSET = 1000
# L2A digital numbers are reflectance x 10000; an asset declaring another scale holds other units.
S2_DN_SCALE = 1e-4

# Searches retry with exponential backoff and jitter on network errors and on throttling/server
# errors, as the reference does (up to 5 retries).
_SEARCH_RETRY = Retry(
    total=5, backoff_factor=1.5, backoff_jitter=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None
)
_SEARCH_TIMEOUT_S = (10, 60)  # connect, read
# Whole-search attempts when a response is cut short; the k-th retry waits min(60, 1.5**k) s x U(0.8, 1.2).
_SEARCH_ATTEMPTS = 6
_SEARCH_BACKOFF_BASE_S = 1.5
_PAGE_SIZE = 250

# Credentials that ride in URLs (SAS tokens, pre-signed queries) or headers.
_URL_QUERY = re.compile(r"((?:https?|s3)://[^\s?#'\"<>]+)\?(?:[^\s'\"<>]*[^\s'\"<>.])?")  # a final "." ends the sentence
_BEARER = re.compile(r"(Bearer\s+)[^\s'\"]+", re.IGNORECASE)
# Query parameters of signed URLs: Azure SAS, AWS and Google pre-signed URLs, CloudFront, tokens.
_SIGNATURE_PARAMETERS = {"sig", "x-amz-signature", "x-amz-security-token", "x-goog-signature", "signature", "token"}


def redact(text: str) -> str:
    """``text`` without URL query strings (where SAS tokens and signatures live) or bearer tokens."""
    return _BEARER.sub(r"\1<redacted>", _URL_QUERY.sub(r"\1?<redacted>", text))


class RedactingFilter(logging.Filter):
    """Rewrites log records so that no signed URL or token reaches a log (GDAL's retry warnings
    name the full URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class UnusableAsset(Exception):
    """An item lacks a band's asset, or the asset holds something other than what we read."""


class Signer(Protocol):
    def sign(self, href: str) -> str:
        """``href`` made readable (e.g. a SAS token appended); called right before each read."""

    def forget(self, href: str) -> bool:
        """Drop the credential used for ``href`` after the server refused it; True if signing
        again can give a different one."""


class NoSigning:
    """Assets that need no credentials."""

    def sign(self, href: str) -> str:
        return href

    def forget(self, href: str) -> bool:
        return False


class Feed(Protocol):
    """Where one sensor's scenes come from and how their bands are read."""

    url: str  # the API searched
    asset_keys: Mapping[str, str]

    def describe(self) -> dict:
        """What identifies the feed's search results (the search cache is reused only for the same)."""

    def search(self, bbox_lonlat: tuple[float, float, float, float], dates: DateRange) -> list[pystac.Item]:
        """Every item intersecting the bbox during the UTC dates."""

    def href(self, item: pystac.Item, band: str) -> str:
        """The readable (signed) href of one band; raises UnusableAsset."""

    def forget(self, href: str) -> bool:
        """After an HTTP 403 for ``href``: drop its credential; True if ``href()`` may now work."""

    def read_options(self) -> dict[str, str]:
        """GDAL configuration options that reads of this feed's assets need (credentials)."""

    def rebase(self, items: list[pystac.Item], cached_from: str) -> list[pystac.Item]:
        """Items from a cache written when the feed's API was at ``cached_from``, made readable now."""


@dataclass(frozen=True)
class StacFeed:
    """One collection of a STAC API, with the asset key of each of our bands."""

    url: str
    collection: str
    asset_keys: Mapping[str, str]  # our band name -> the collection's asset key
    signer: Signer = field(default_factory=NoSigning)
    # The demo API listens on a new port every run: its cache is keyed without the URL and its
    # asset hrefs are moved onto the current root when reused.
    ephemeral_url: bool = False
    # The demo's API (stac-fastapi-static 1.0) lists items in the order of a hash of their hrefs (it
    # sorts its "walk paths", xxh3 digests of each href part: core/walk_path.py), which no catalog
    # layout can steer; Planetary Computer's pgstac, which it stands in for, by datetime, then id,
    # descending. The fetch keeps the server's order among same-datetime granules (as the
    # reference), so the demo's results are put in pgstac's.
    pgstac_order: bool = False

    def describe(self) -> dict:
        described = {"collection": self.collection}
        return described if self.ephemeral_url else {"url": self.url, **described}

    def href(self, item: pystac.Item, band: str) -> str:
        key = self.asset_keys[band]
        asset = item.assets.get(key)
        if asset is None:
            raise UnusableAsset(f"item has no asset {key!r}" + (f" ({band})" if key != band else ""))
        if band in S2_BANDS:
            # Earth Search declares scale 0.0001 with offset -0.1 on every reflectance asset while
            # its COGs already have the baseline offset removed (earthsearch:boa_offset_applied);
            # applying the offset would subtract it twice, so we read the DN as stored, as the
            # reference does, and only refuse assets whose scale says they are not L2A DN.
            scale = _raster_band(asset).get("scale", S2_DN_SCALE)
            if not np.isclose(scale, S2_DN_SCALE):
                raise UnusableAsset(f"asset {key!r} has raster:bands scale {scale}, not {S2_DN_SCALE} (L2A DN)")
        return self.signer.sign(asset.get_absolute_href())

    def forget(self, href: str) -> bool:
        return self.signer.forget(href)

    def read_options(self) -> dict[str, str]:
        return {}

    def rebase(self, items: list[pystac.Item], cached_from: str) -> list[pystac.Item]:
        old_root, new_root = cached_from.rstrip("/") + "/", self.url.rstrip("/") + "/"
        if self.ephemeral_url and old_root != new_root:
            for item in items:
                for asset in item.assets.values():
                    if asset.href.startswith(old_root):
                        asset.href = new_root + asset.href[len(old_root):]
        return items

    def search(self, bbox_lonlat: tuple[float, float, float, float], dates: DateRange) -> list[pystac.Item]:
        """Every page of a POST /search per box of the bbox (two next to ±180°, see ``split_bbox``),
        then only items that really match (see ``_MergingStacApiIO``) and the latest processing of
        each scene (see ``latest_processing``).

        Each request is retried by urllib3 (connection errors, 429, 5xx); a response cut short
        after its headers is not, so the whole search is run again, with the reference's backoff.
        A source still failing with 429/5xx or timeouts after that is unavailable (transient);
        other failures (a wrong URL or collection) are the user's to fix.
        """
        start, end = dates.start, dates.end
        items = []
        boxes = split_bbox(bbox_lonlat)
        for box_lonlat in boxes:
            items += self._search_box(box_lonlat, start, end)
        if len(boxes) > 1:  # a scene across ±180° is found from both sides
            items = list({item.id: item for item in items}.values())
        found = latest_processing(_matching(items, self.collection, bbox_lonlat, start, end))
        if self.pgstac_order:
            found.sort(key=lambda item: (_as_utc(item.datetime or item.common_metadata.start_datetime), item.id),
                       reverse=True)
        return found

    def _search_box(self, bbox_lonlat, start: dt.datetime, end: dt.datetime) -> list[pystac.Item]:
        for attempt in range(1, _SEARCH_ATTEMPTS + 1):
            try:
                return self._all_pages(bbox_lonlat, start, end)
            except (pystac_client.exceptions.APIError, pystac_client.warnings.DoesNotConformTo, OSError, ValueError) as exc:
                if attempt < _SEARCH_ATTEMPTS and _cut_short(exc):
                    time.sleep(min(60.0, _SEARCH_BACKOFF_BASE_S ** attempt) * random.uniform(0.8, 1.2))
                    continue
                reason = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
                if _transient(exc):
                    raise SourceUnavailable(f"searching {self.collection} at {self.url} failed ({reason})") from None
                raise UserError(
                    f"searching {self.collection} at {self.url} failed ({reason}): check the network or the source and rerun"
                ) from None
        raise AssertionError("unreachable")

    def _all_pages(self, bbox_lonlat, start: dt.datetime, end: dt.datetime) -> list[pystac.Item]:
        stac_io = _MergingStacApiIO(timeout=_SEARCH_TIMEOUT_S, max_retries=_SEARCH_RETRY)
        client = pystac_client.Client.open(self.url, stac_io=stac_io)
        found = client.search(
            collections=[self.collection],
            bbox=list(bbox_lonlat),
            datetime=[start, end],
            limit=_PAGE_SIZE,
            method="POST",
        )
        return [pystac.Item.from_dict(d, preserve_dict=False) for d in found.items_as_dicts()]


def split_bbox(bbox_lonlat: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """The bbox as boxes that do not cross ±180°.

    A window next to the antimeridian has a lon/lat box whose west edge is east of its east edge
    (e.g. 179.898 ... -179.999, as ``transform_bounds`` gives it): taken as a shapely box, or sent
    to a server that does not read it the GeoJSON way (RFC 7946 §5.2), it spans the globe and the
    search returns the whole latitude band. Split, it is one box each side of ±180°.
    """
    west, south, east, north = bbox_lonlat
    if west <= east:
        return [(west, south, east, north)]
    return [(west, south, 180.0, north), (-180.0, south, east, north)]


def bbox_area(bbox_lonlat: tuple[float, float, float, float]):
    """The bbox as a (Multi)Polygon in lon/lat that does not cross ±180°."""
    boxes = [shapely.box(*b) for b in split_bbox(bbox_lonlat)]
    return boxes[0] if len(boxes) == 1 else shapely.MultiPolygon(boxes)


# Earth Search ids end in the processing version: S2A_13TDE_20231008_0_L2A, ..._1_L2A. A scene
# reprocessed keeps both items, with different DN and earthsearch:boa_offset_applied set unreliably
# (element84/earth-search issues #66, #71).
_PROCESSING_VERSION = re.compile(r"_(?P<version>\d+)_L[12][AC]$")


def latest_processing(items: list[pystac.Item]) -> list[pystac.Item]:
    """One item per acquisition: of items of the same collection, grid square (``grid:code``, which
    Earth Search gives and MPC does not), platform and datetime, the latest processing (``updated``, else ``created``,
    then the id's processing version).

    Reading both processings would put one acquisition in a date twice, with DN that differ by the
    baseline-04.00 offset where only one had it removed. Items without a grid square pass unchanged.
    """
    latest: dict[tuple, pystac.Item] = {}
    kept: list[pystac.Item] = []
    for item in items:
        square = item.properties.get("grid:code")
        if square is None or item.datetime is None:
            kept.append(item)
            continue
        key = (item.collection_id, square, str(item.properties.get("platform", "")).lower(), item.datetime)
        if key not in latest or _processing_rank(item) > _processing_rank(latest[key]):
            latest[key] = item
    dropped = len(items) - len(kept) - len(latest)
    if dropped:
        log.info("%d older processing(s) of scenes also listed in a newer one ignored", dropped)
    return kept + list(latest.values())


def _processing_rank(item: pystac.Item) -> tuple[str, int]:
    version = _PROCESSING_VERSION.search(item.id)
    return (str(item.properties.get("updated") or item.properties.get("created") or ""),
            int(version["version"]) if version else -1)


def _transient(exc: BaseException) -> bool:
    """A search failure that a later attempt may not meet: throttling, server errors, timeouts."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return int(status) == 429 or int(status) >= 500
    text = str(exc)
    if any(marker in text for marker in ("NameResolution", "Name or service not known", "NewConnectionError",
                                         "Connection refused", "InvalidURL", "MissingSchema")):
        return False  # nothing answers at that address: most likely a wrong URL
    return any(marker in text for marker in ("too many 5", "too many 429", "timed out", "RemoteDisconnected",
                                             "Connection reset", "Connection aborted"))


def _cut_short(exc: BaseException) -> bool:
    """A response that ended before its body did: pystac-client wraps requests' error in an APIError."""
    if isinstance(exc, json.JSONDecodeError):
        return True
    cause = exc.__context__
    return isinstance(cause, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError))


class _MergingStacApiIO(StacApiIO):
    """Follows a POST ``next`` link with the original search body under the link's body.

    STAC API says a ``next`` body replaces the request body unless ``merge: true``. MPC sends the
    whole body back (plus ``token``) and Earth Search sends ``merge: false`` with a body that may
    hold only ``next``: taken literally, its second page drops the query. Merging gives the same
    request for MPC and the intended one for Earth Search.
    """

    def read_text(self, source, *args, **kwargs):
        if isinstance(source, pystac.Link) and source.extra_fields.get("method") == "POST":
            source = pystac.Link.from_dict({**source.to_dict(), "merge": True})  # Link.clone() drops method and body
        return super().read_text(source, *args, **kwargs)


def _matching(items: list[pystac.Item], collection: str, bbox_lonlat, start: dt.datetime, end: dt.datetime) -> list[pystac.Item]:
    """Items of ``collection`` in [start, end] whose footprint meets the bbox, each once.

    A server that loses the query while paging would otherwise flood the fetch with scenes from
    anywhere; they are dropped here and counted in a warning.
    """
    area = bbox_area(bbox_lonlat)
    kept: dict[str, pystac.Item] = {}
    for item in items:
        when = item.datetime or item.common_metadata.start_datetime
        if (
            item.collection_id in (collection, None)
            and when is not None and start <= _as_utc(when) <= end
            and (item.geometry is None or shape(item.geometry).intersects(area))
        ):
            kept.setdefault(item.id, item)
    if len(kept) != len(items):
        log.warning("%d of %d items returned for %s were outside the query or repeated; ignored",
                    len(items) - len(kept), len(items), collection)
    return list(kept.values())


def _as_utc(when: dt.datetime) -> dt.datetime:
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def _raster_band(asset: pystac.Asset) -> dict:
    bands = asset.extra_fields.get("raster:bands") or [{}]
    return bands[0]


@dataclass(frozen=True)
class Source:
    """A Sentinel-2 and a Sentinel-1 feed, and how the reference treats their data."""

    name: str
    s2: Feed
    s1: Feed
    harmonisation: str
    # gamma0 onto the tile grid: the reference stacks MPC's 10 m RTC with stackstac's default
    # (nearest) and warps OPERA's 30 m bursts bilinearly (UPSTREAM.md §1.4).
    s1_resampling: str = "bilinear"

    def __post_init__(self):
        if self.harmonisation not in HARMONISATION_RULES:
            raise ValueError(f"source {self.name}: harmonisation {self.harmonisation!r} is not one of {HARMONISATION_RULES}")
        for sensor, feed, needed in (("s2", self.s2, S2_NEEDS), ("s1", self.s1, S1_POLARISATIONS)):
            missing = set(needed) - set(feed.asset_keys)
            if missing:
                raise ValueError(f"source {self.name}: no {sensor} asset key for bands {sorted(missing)}")

    @property
    def data_kind(self) -> str:
        """The kind of these data, which picks a family's normalisation table where it has one per
        kind (v1.1): ``mpc`` for S2 brought to
        the old baseline by the MPC rule, ``aws`` for S2 as stored (Earth Search's, OPERA's S1)."""
        return "mpc" if self.harmonisation == "mpc" else "aws"

    def harmonise_s2(self, values: np.ndarray, item: pystac.Item) -> np.ndarray:
        """S2 reflectance DN of ``item`` (float, or uint16 as stored) brought to the pre-2022 baseline
        with this source's rule. In uint16 the subtraction wraps below the offset, where its result
        is not taken."""
        if self.harmonisation == "mpc" and carries_boa_offset(item):
            return np.where(values >= MPC_BOA_OFFSET, values - MPC_BOA_OFFSET, values)
        return values


def carries_boa_offset(item: pystac.Item) -> bool:
    """Whether an L2A item's DN carry the BOA offset: by its processing baseline where it states one
    that parses (``"05.11"``), else by the reference's acquisition-date rule."""
    try:
        baseline = tuple(int(part) for part in str(item.properties["s2:processing_baseline"]).split("."))
    except (KeyError, ValueError):
        return utc_date(item) > MPC_OFFSET_FROM
    return baseline >= MPC_OFFSET_BASELINE


def utc_date(item: pystac.Item) -> dt.date:
    """The UTC calendar date an item was acquired on (naive datetimes taken as UTC)."""
    when = item.datetime or item.common_metadata.start_datetime
    if when.tzinfo is None:
        return when.date()
    return when.astimezone(dt.timezone.utc).date()


def cached_search(
    source: Source, feed: Feed, bbox_lonlat: tuple[float, float, float, float], dates: DateRange, cache: Path | None
) -> list[pystac.Item]:
    """``feed.search`` remembered in ``cache``, so that rerunning a failed fetch does not search again.

    The cache is a GeoJSON FeatureCollection of the unsigned items (signatures expire) with the query
    that found them; it is reused only for the same source, feed, bbox and dates.
    """
    query = {"source": source.name, **feed.describe(), "bbox": [float(v) for v in bbox_lonlat],
             "dates": [dates.first.isoformat(), dates.last.isoformat()]}
    if cache is not None and cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("tessera:query") == query and cached.get("tessera:reusable", True):
            items = [pystac.Item.from_dict(d) for d in cached["features"]]
            return feed.rebase(items, cached["tessera:api_url"])
    items = feed.search(bbox_lonlat, dates)
    if cache is not None:
        features = [item.to_dict(transform_hrefs=False) for item in items]
        unsigned = _without_signatures(features)
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({
                "type": "FeatureCollection",
                "tessera:query": query,
                "tessera:api_url": feed.url,
                # An API that hands out pre-signed hrefs: the record keeps the scenes, not the
                # signatures, and a rerun has to search again for fresh ones.
                "tessera:reusable": unsigned == features,
                "features": unsigned,
            }))
    return items


def _without_signatures(features: list[dict]) -> list[dict]:
    """Item dicts whose asset hrefs lose a query string that carries a signature or a token."""
    cleaned = []
    for feature in features:
        assets = {}
        for key, asset in feature.get("assets", {}).items():
            href, _, query = asset.get("href", "").partition("?")
            signed = {name.lower() for name in parse_qs(query)} & _SIGNATURE_PARAMETERS
            assets[key] = {**asset, "href": href} if signed else asset
        cleaned.append({**feature, "assets": assets})
    return cleaned
