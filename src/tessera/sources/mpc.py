"""Microsoft Planetary Computer's shape: collection ids, asset keys and harmonisation rule.

The demo source serves items of the same shape, so both are built here.
"""

from __future__ import annotations

from collections.abc import Callable

from tessera.sources.stac import BANDS, Source, unsigned

MPC_STAC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
MPC_S2_COLLECTION = "sentinel-2-l2a"
MPC_S1_COLLECTION = "sentinel-1-rtc"
# MPC names S2 assets by band id (B02 ... SCL) and S1 RTC assets vv / vh: the same as ours.
MPC_ASSET_KEYS = {band: band for band in BANDS}


def mpc_shaped_source(name: str, url: str, sign: Callable[[str], str] = unsigned) -> Source:
    """A source whose items look like MPC's (collections, asset keys, the "mpc" harmonisation)."""
    return Source(
        name=name,
        url=url,
        s2_collection=MPC_S2_COLLECTION,
        s1_collection=MPC_S1_COLLECTION,
        asset_keys=MPC_ASSET_KEYS,
        harmonisation="mpc",
        sign=sign,
    )
