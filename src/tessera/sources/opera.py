"""Sentinel-1 from OPERA RTC-S1 (``OPERA_L2_RTC-S1_V1``): bursts found in NASA CMR with asf-search,
read as COGs with Earthdata Login credentials.

Each burst product has ``_VV.tif`` and ``_VH.tif`` (linear gamma0 power, float32, 30 m, UTM) and
``_mask.tif`` (0 = valid; layover, shadow and no-data otherwise). A burst becomes a pystac Item with
assets ``vv``, ``vh`` and ``mask`` and ``sat:orbit_state`` from the granule's ASCENDING_DESCENDING
attribute, so the fetch treats it like any other S1 item. Unlike the reference, which ignores the
mask, the fetch drops masked pixels.

Credentials, first found wins: ``EARTHDATA_TOKEN`` (an EDL bearer token); a token file
(``EARTHDATA_TOKEN_FILE``, default ``~/.edl_bearer_token`` as the reference) that only its owner
may read; a ``~/.netrc`` (or ``NETRC``) with an ``urs.earthdata.nasa.gov`` entry, also owner-only.
They go to GDAL as configuration options of the reads (never into a file, a URL or a log).
"""

from __future__ import annotations

import datetime as dt
import netrc
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import asf_search
import pystac
import requests
import shapely
from asf_search.constants import INTERNAL
from shapely.geometry import shape

from tessera.errors import UserError
from tessera.sources.stac import S1_MASK, UnusableAsset

OPERA_SHORT_NAME = "OPERA_L2_RTC-S1_V1"
# Our band -> asset key of the items made from bursts, and the file name suffix of each layer.
OPERA_ASSET_KEYS = {"vv": "vv", "vh": "vh", S1_MASK: S1_MASK}
_LAYER_SUFFIXES = {"_VV.tif": "vv", "_VH.tif": "vh", "_mask.tif": S1_MASK}
EARTHDATA_LOGIN_HOST = "urs.earthdata.nasa.gov"
DEFAULT_TOKEN_FILE = "~/.edl_bearer_token"

_CREDENTIALS_HELP = (
    "set EARTHDATA_TOKEN to an Earthdata Login token, write it to ~/.edl_bearer_token (chmod 600), "
    f"or add 'machine {EARTHDATA_LOGIN_HOST} login USER password PASS' to ~/.netrc (chmod 600)"
)


def earthdata_gdal_options() -> dict[str, str]:
    """GDAL configuration options that authenticate reads of Earthdata-hosted files."""
    token = os.environ.get("EARTHDATA_TOKEN", "").strip()
    if token:
        return _bearer(token)
    token_file = Path(os.environ.get("EARTHDATA_TOKEN_FILE") or DEFAULT_TOKEN_FILE).expanduser()
    if token_file.exists():
        _refuse_if_shared(token_file, "Earthdata token file")
        token = token_file.read_text().strip()
        if not token:
            raise UserError(f"Earthdata token file {token_file} is empty: write your Earthdata Login token into it")
        return _bearer(token)
    netrc_file = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    if netrc_file.exists():
        _refuse_if_shared(netrc_file, "netrc file")
        try:
            entry = netrc.netrc(netrc_file).authenticators(EARTHDATA_LOGIN_HOST)
        except netrc.NetrcParseError as exc:
            raise UserError(f"netrc file {netrc_file} cannot be parsed (line {exc.lineno}): fix its syntax") from None
        if entry is None:
            raise UserError(f"netrc file {netrc_file} has no entry for {EARTHDATA_LOGIN_HOST}: {_CREDENTIALS_HELP}")
        # Earthdata Login answers with redirects that set session cookies; "" keeps them in memory.
        return {"GDAL_HTTP_NETRC": "YES", "GDAL_HTTP_NETRC_FILE": str(netrc_file), "GDAL_HTTP_COOKIEFILE": ""}
    raise UserError(f"reading OPERA RTC-S1 needs Earthdata Login credentials: {_CREDENTIALS_HELP}")


def _bearer(token: str) -> dict[str, str]:
    return {"GDAL_HTTP_AUTH": "BEARER", "GDAL_HTTP_BEARER": token}


def _refuse_if_shared(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{what} {path} is readable by others (mode {mode:04o}): run chmod 600 {path}")


@dataclass(frozen=True)
class OperaFeed:
    """OPERA RTC-S1 bursts from NASA CMR (``cmr_host``), read with Earthdata Login credentials."""

    cmr_host: str = INTERNAL.CMR_HOST
    asset_keys = OPERA_ASSET_KEYS

    @property
    def url(self) -> str:
        return f"https://{self.cmr_host}"

    def describe(self) -> dict:
        return {"url": self.url, "collection": OPERA_SHORT_NAME}

    def search(self, bbox_lonlat: tuple[float, float, float, float], year: int) -> list[pystac.Item]:
        # asf-search would otherwise post failed queries to ASF's error-report endpoint.
        asf_search.REPORT_ERRORS = False
        try:
            products = asf_search.search(
                shortName=OPERA_SHORT_NAME,
                intersectsWith=shapely.box(*bbox_lonlat).wkt,
                start=dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc),
                end=dt.datetime(year, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc),
                opts=asf_search.ASFSearchOptions(host=self.cmr_host),
            )
        except (asf_search.ASFError, requests.RequestException, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"searching {OPERA_SHORT_NAME} in CMR at {self.cmr_host} failed ({reason}): "
                            "check the network and rerun") from None
        return _latest_per_burst(_burst_item(product) for product in products)

    def href(self, item: pystac.Item, band: str) -> str:
        asset = item.assets.get(self.asset_keys[band])
        if asset is None:
            polarisations = "+".join(item.properties.get("sar:polarizations") or []) or "unknown"
            raise UnusableAsset(f"burst has no {band.upper() if band != S1_MASK else band} layer (polarisations {polarisations})")
        return asset.href

    def forget(self, href: str) -> bool:
        return False

    def read_options(self) -> dict[str, str]:
        return earthdata_gdal_options()

    def rebase(self, items: list[pystac.Item], cached_from: str) -> list[pystac.Item]:
        return items


def _burst_item(product: asf_search.ASFProduct) -> pystac.Item:
    properties = product.properties
    hrefs = {}
    for url in [properties.get("url"), *(properties.get("additionalUrls") or [])]:
        for suffix, key in _LAYER_SUFFIXES.items():
            # Each layer is listed for HTTPS download and as an s3:// URL for in-region access.
            if url and urlparse(url).scheme in ("http", "https") and url.endswith(suffix):
                hrefs[key] = url
    start = dt.datetime.fromisoformat(properties["startTime"].replace("Z", "+00:00"))
    stop = dt.datetime.fromisoformat(properties["stopTime"].replace("Z", "+00:00"))
    geometry = product.geometry
    item = pystac.Item(
        id=properties["fileID"],
        geometry=geometry,
        bbox=list(shape(geometry).bounds),
        datetime=start,
        properties={
            "start_datetime": pystac.utils.datetime_to_str(start),
            "end_datetime": pystac.utils.datetime_to_str(stop),
            "platform": properties.get("platform"),
            "sat:orbit_state": str(properties.get("flightDirection") or "").lower(),
            "sat:relative_orbit": properties.get("pathNumber"),
            "sat:absolute_orbit": properties.get("orbit"),
            "sar:polarizations": properties.get("polarization"),
            "opera:burst_id": properties.get("operaBurstID"),
            "processing:datetime": properties.get("processingDate"),
        },
        collection=OPERA_SHORT_NAME,
    )
    for key, href in hrefs.items():
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"]))
    return item


def _latest_per_burst(items) -> list[pystac.Item]:
    """One item per burst and acquisition: CMR lists every reprocessing of a burst; the latest wins."""
    latest: dict[tuple, pystac.Item] = {}
    for item in items:
        key = (item.properties.get("opera:burst_id"), item.datetime)
        held = latest.get(key)
        if held is None or str(item.properties.get("processing:datetime")) > str(held.properties.get("processing:datetime")):
            latest[key] = item
    return sorted(latest.values(), key=lambda item: (item.datetime, item.id))
