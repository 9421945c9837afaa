"""STAC-based data sources: collections, asset names, href signing, harmonisation and search."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pystac
import pystac_client
from pystac_client.stac_api_io import StacApiIO
from urllib3.util.retry import Retry

from tessera.errors import UserError
from tessera.io import atomic_path

# Our band names. S2_BANDS is the channel order of the reference bands.npy (not wavelength order).
S2_BANDS = ("B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12")
S2_SCL = "SCL"
S1_POLARISATIONS = ("vv", "vh")
BANDS = (*S2_BANDS, S2_SCL, *S1_POLARISATIONS)

# "mpc": MPC's L2A items carry the +1000 DN BOA offset of processing baseline 04.00 and the
# reference removes it by acquisition date, only from values >= 1000 (UPSTREAM.md §1.3 step 7).
# "none": the archive already removed the offset (Earth Search).
HARMONISATION_RULES = ("mpc", "none")
MPC_OFFSET_FROM = dt.date(2022, 1, 25)  # strictly after this UTC date
MPC_BOA_OFFSET = 1000

# Searches retry with exponential backoff on network errors and on throttling/server errors, as
# the reference does (up to 5 retries).
_SEARCH_RETRY = Retry(total=5, backoff_factor=1.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None)
_SEARCH_TIMEOUT_S = (10, 60)  # connect, read
_PAGE_SIZE = 250


def unsigned(href: str) -> str:
    """The signer of sources whose assets need no credentials."""
    return href


@dataclass(frozen=True)
class Source:
    """A STAC API and what we need to know to read its Sentinel-1/2 items the reference's way."""

    name: str
    url: str
    s2_collection: str
    s1_collection: str
    asset_keys: Mapping[str, str]  # our band name (BANDS) -> the source's asset key
    harmonisation: str
    sign: Callable[[str], str] = unsigned

    def __post_init__(self):
        if self.harmonisation not in HARMONISATION_RULES:
            raise ValueError(f"source {self.name}: harmonisation {self.harmonisation!r} is not one of {HARMONISATION_RULES}")
        missing = set(BANDS) - set(self.asset_keys)
        if missing:
            raise ValueError(f"source {self.name}: no asset key for bands {sorted(missing)}")

    def href(self, item: pystac.Item, band: str) -> str:
        """The signed href of one band of an item; KeyError if the item lacks that asset."""
        key = self.asset_keys[band]
        if key not in item.assets:
            raise KeyError(f"item has no asset {key!r}" + (f" ({band})" if key != band else ""))
        return self.sign(item.assets[key].get_absolute_href())

    def harmonise_s2(self, values: np.ndarray, acquired: dt.date) -> np.ndarray:
        """S2 reflectance (float DN) brought to the pre-2022 baseline with this source's rule."""
        if self.harmonisation == "mpc" and acquired > MPC_OFFSET_FROM:
            return np.where(values >= MPC_BOA_OFFSET, values - MPC_BOA_OFFSET, values)
        return values

    def search(self, collection: str, bbox_lonlat: tuple[float, float, float, float], year: int) -> list[pystac.Item]:
        """All items of ``collection`` intersecting the bbox during the UTC calendar ``year`` (every page)."""
        try:
            client = pystac_client.Client.open(
                self.url, stac_io=StacApiIO(timeout=_SEARCH_TIMEOUT_S, max_retries=_SEARCH_RETRY)
            )
            found = client.search(
                collections=[collection],
                bbox=list(bbox_lonlat),
                datetime=f"{year}-01-01T00:00:00Z/{year}-12-31T23:59:59.999999Z",
                limit=_PAGE_SIZE,
            )
            return list(found.items())
        except (pystac_client.exceptions.APIError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"source {self.name}: searching {collection} at {self.url} failed ({reason}): check the network or the source and rerun"
            ) from None


def cached_search(
    source: Source, collection: str, bbox_lonlat: tuple[float, float, float, float], year: int, cache: Path | None
) -> list[pystac.Item]:
    """``source.search`` remembered in a JSON file, so that rerunning a failed fetch does not search again.

    The cache holds unsigned items (signatures expire). It is reused only for the same source,
    collection, bbox and year. Asset hrefs under the API root that made the cache are moved onto the
    current root: the demo API listens on a new port every run.
    """
    query = {"source": source.name, "collection": collection, "bbox": list(bbox_lonlat), "year": year}
    if cache is not None and cache.exists():
        cached = json.loads(cache.read_text())
        if cached["query"] == query:
            return [_rebase_assets(pystac.Item.from_dict(d), cached["api_url"], source.url) for d in cached["items"]]
    items = source.search(collection, bbox_lonlat, year)
    if cache is not None:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({
                "query": query,
                "api_url": source.url,
                "items": [item.to_dict(transform_hrefs=False) for item in items],
            }))
    return items


def _rebase_assets(item: pystac.Item, old_root: str, new_root: str) -> pystac.Item:
    old_root, new_root = old_root.rstrip("/") + "/", new_root.rstrip("/") + "/"
    if old_root != new_root:
        for asset in item.assets.values():
            if asset.href.startswith(old_root):
                asset.href = new_root + asset.href[len(old_root):]
    return item
