"""Sentinel-1 from OPERA RTC-S1 (``OPERA_L2_RTC-S1_V1``): bursts found in NASA CMR with asf-search,
read as COGs through Earthdata Login (``tessera.sources.earthdata``).

Each burst product has ``_VV.tif`` and ``_VH.tif`` (linear gamma0 power, float32, 30 m, UTM) and
``_mask.tif`` (0 = valid; layover, shadow and no-data otherwise). A burst becomes a pystac Item with
assets ``vv``, ``vh`` and ``mask`` and ``sat:orbit_state`` from the granule's ASCENDING_DESCENDING
attribute, so the fetch treats it like any other S1 item. Unlike the reference, which ignores the
mask, the fetch drops masked pixels.

An href is resolved right before its read into a presigned URL that GDAL reads without credentials
(see ``earthdata``): the token never goes to GDAL, a file or a log.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from urllib.parse import urlparse

import asf_search
import pystac
import requests
import shapely
from asf_search.constants import INTERNAL
from shapely.geometry import shape

from tessera.errors import SourceUnavailable, UserError
from tessera.period import DateRange
from tessera.sources.earthdata import EarthdataResolver
from tessera.sources.stac import S1_MASK, UnusableAsset, split_bbox

OPERA_SHORT_NAME = "OPERA_L2_RTC-S1_V1"
# Our band -> asset key of the items made from bursts, and the file name suffix of each layer.
OPERA_ASSET_KEYS = {"vv": "vv", "vh": "vh", S1_MASK: S1_MASK}
_LAYER_SUFFIXES = {"_VV.tif": "vv", "_VH.tif": "vh", "_mask.tif": S1_MASK}


@dataclass(frozen=True)
class OperaFeed:
    """OPERA RTC-S1 bursts from NASA CMR (``cmr_host``), read with Earthdata Login credentials."""

    cmr_host: str = INTERNAL.CMR_HOST
    resolver: EarthdataResolver = field(default_factory=EarthdataResolver, compare=False, repr=False)
    asset_keys = OPERA_ASSET_KEYS

    @property
    def url(self) -> str:
        return f"https://{self.cmr_host}"

    def describe(self) -> dict:
        return {"url": self.url, "collection": OPERA_SHORT_NAME}

    def search(self, bbox_lonlat: tuple[float, float, float, float], dates: DateRange) -> list[pystac.Item]:
        # asf-search would otherwise post failed queries to ASF's error-report endpoint.
        asf_search.REPORT_ERRORS = False
        products = []
        for box_lonlat in split_bbox(bbox_lonlat):  # two boxes next to ±180°
            products += self._search_box(box_lonlat, dates)
        unique = {product.properties["fileID"]: product for product in products}
        return _latest_per_burst(_burst_item(product) for product in unique.values())

    def _search_box(self, bbox_lonlat, dates: DateRange) -> list:
        try:
            results = asf_search.search(
                shortName=OPERA_SHORT_NAME,
                intersectsWith=shapely.box(*bbox_lonlat).wkt,
                start=dates.start,
                end=dates.end,
                opts=asf_search.ASFSearchOptions(host=self.cmr_host),
            )
        except asf_search.exceptions.ASFSearch4xxError as exc:
            raise UserError(f"CMR at {self.cmr_host} refused the search for {OPERA_SHORT_NAME} "
                            f"({str(exc).splitlines()[0]}): check the source configuration") from None
        except (asf_search.ASFError, asf_search.exceptions.CMRError, requests.RequestException, ValueError) as exc:
            # CMRError covers CMRIncompleteError, which asf-search raises outside its ASFError tree.
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceUnavailable(f"searching {OPERA_SHORT_NAME} in CMR at {self.cmr_host} failed ({reason})") from None
        if not getattr(results, "searchComplete", True):
            # A page shorter than asked while CMR counts more hits: asf-search logs it and returns
            # what it has. A tile built on it would silently lack bursts.
            raise SourceUnavailable(f"CMR at {self.cmr_host} answered {OPERA_SHORT_NAME} incompletely "
                                    f"({len(results)} bursts, fewer than it counted)")
        return list(results)

    def href(self, item: pystac.Item, band: str) -> str:
        asset = item.assets.get(self.asset_keys[band])
        if asset is None:
            polarisations = "+".join(item.properties.get("sar:polarizations") or []) or "unknown"
            raise UnusableAsset(f"burst has no {band.upper() if band != S1_MASK else band} layer (polarisations {polarisations})")
        return self.resolver.resolve(asset.href)

    def forget(self, href: str) -> bool:
        """After a 403 on a presigned URL (expired): resolve its href again on the next read."""
        return any(self.resolver.forget(original) for original in self.resolver.hrefs_resolved_to(href))

    def read_options(self) -> dict[str, str]:
        self.resolver.credentials  # noqa: B018 - missing or refused credentials fail the fetch before any read
        return {}

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
