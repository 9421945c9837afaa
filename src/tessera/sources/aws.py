"""The reference's "aws" source: Sentinel-2 L2A from Element84's Earth Search, Sentinel-1 from OPERA RTC-S1.

Earth Search names S2 assets by common name (red, nir08, scl...). The reference applies no
harmonisation to these data (UPSTREAM.md §1.3 step 7), and neither do we: see ``StacFeed.href``.
"""

from __future__ import annotations

from tessera.sources.opera import OperaFeed
from tessera.sources.stac import Source, StacFeed

EARTH_SEARCH_URL = "https://earth-search.aws.element84.com/v1"
EARTH_SEARCH_S2_COLLECTION = "sentinel-2-l2a"
EARTH_SEARCH_ASSET_KEYS = {
    "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2", "B07": "rededge3",
    "B08": "nir", "B8A": "nir08", "B11": "swir16", "B12": "swir22", "SCL": "scl",
}


def aws_source(earth_search_url: str | None = None, cmr_host: str | None = None) -> Source:
    """Earth Search S2 (no signing) and OPERA RTC-S1 from CMR (Earthdata Login for the reads)."""
    opera = OperaFeed() if cmr_host is None else OperaFeed(cmr_host)
    return Source(
        name="aws",
        s2=StacFeed(earth_search_url or EARTH_SEARCH_URL, EARTH_SEARCH_S2_COLLECTION, EARTH_SEARCH_ASSET_KEYS),
        s1=opera,
        harmonisation="none",
    )
