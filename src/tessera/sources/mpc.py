"""Microsoft Planetary Computer: collections, asset keys, harmonisation rule and SAS signing.

The demo source serves items of the same shape, so both are built here.

Signing: an MPC asset href is readable with a SAS token of its storage account and container,
appended as a query string. ``planetary_computer.sign_url`` gets tokens from the SAS API (with the
subscription key of ``PC_SDK_SUBSCRIPTION_KEY``, if set) and caches them until a minute before they
expire. We sign each href right before each read, never once for a whole run (the reference signs
items once at search time; its long partitions outlive the tokens, UPSTREAM.md §10.7), and when
a read fails drop the cached token and sign again once.
"""

from __future__ import annotations

from urllib.parse import urlparse

import planetary_computer
import planetary_computer.sas
import planetary_computer.settings
import planetary_computer.utils

from tessera.sources.stac import BANDS, NoSigning, Signer, Source, StacFeed

MPC_STAC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
MPC_S2_COLLECTION = "sentinel-2-l2a"
MPC_S1_COLLECTION = "sentinel-1-rtc"
# MPC names S2 assets by band id (B02 ... SCL) and S1 RTC assets vv / vh: the same as ours.
MPC_ASSET_KEYS = {band: band for band in BANDS}


class PlanetaryComputerSigner:
    """SAS-signs Azure Blob Storage hrefs with the planetary-computer SDK; other hrefs pass unchanged."""

    def sign(self, href: str) -> str:
        return planetary_computer.sign_url(href)

    def forget(self, href: str) -> bool:
        parsed = urlparse(href)
        if not parsed.netloc.endswith(planetary_computer.sas.BLOB_STORAGE_DOMAIN):
            return False
        account, container = planetary_computer.utils.parse_blob_url(parsed)
        sas_url = planetary_computer.settings.Settings.get().sas_url
        planetary_computer.sas.TOKEN_CACHE.pop(f"{sas_url}/{account}/{container}", None)
        return True


def mpc_shaped_source(name: str, url: str, signer: Signer | None = None, *, ephemeral_url: bool = False) -> Source:
    """A source whose items look like MPC's (collections, asset keys, the "mpc" harmonisation and the
    reference's nearest resampling of MPC's RTC)."""
    signer = signer or NoSigning()
    return Source(
        name=name,
        s2=StacFeed(url, MPC_S2_COLLECTION, MPC_ASSET_KEYS, signer, ephemeral_url=ephemeral_url),
        s1=StacFeed(url, MPC_S1_COLLECTION, MPC_ASSET_KEYS, signer, ephemeral_url=ephemeral_url),
        harmonisation="mpc",
        s1_resampling="nearest",
    )


def mpc_source(url: str = MPC_STAC_URL) -> Source:
    """Planetary Computer: sentinel-2-l2a and sentinel-1-rtc, SAS-signed per read."""
    return mpc_shaped_source("mpc", url, PlanetaryComputerSigner())
