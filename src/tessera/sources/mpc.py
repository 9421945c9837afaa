"""Microsoft Planetary Computer: collections, asset keys, harmonisation rule and SAS signing.

The demo source serves items of the same shape, so both are built here.

Signing: an MPC asset href is readable with a SAS token of its storage account and container,
appended as a query string. Tokens come from the SAS API (``{sas_url}/{account}/{container}``,
the planetary-computer SDK's settings: ``PC_SDK_SAS_URL``; no subscription key is needed, and
none can be created any more) and live about an hour (``msft:expiry``). We sign each href right
before each read, never once for a whole run (the reference signs items once at search time; its
long partitions outlive the tokens, UPSTREAM.md §10.7), keep a token until a minute before it
expires, and when a read is refused (403: the token expired or was revoked mid-read) drop it and
sign again.

The token request is ours, not the SDK's ``sign_url``: the SDK retries without a timeout (a
stalled endpoint hangs the job) and lets ``requests``' errors escape, which are OSErrors. Here the
request has timeouts and is retried on 429 (honouring ``Retry-After``), 5xx, dropped connections
and timeouts, with backoff; past the retries the failure is ``SourceUnavailable`` (the tile fails,
a rerun continues), never a scene skipped or a disk error.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from urllib.parse import urlparse

import requests

from tessera.errors import SourceUnavailable
from tessera.sources.stac import BANDS, NoSigning, Signer, Source, StacFeed

MPC_STAC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
MPC_S2_COLLECTION = "sentinel-2-l2a"
MPC_S1_COLLECTION = "sentinel-1-rtc"
# MPC names S2 assets by band id (B02 ... SCL) and S1 RTC assets vv / vh: the same as ours.
MPC_ASSET_KEYS = {band: band for band in BANDS}
BLOB_STORAGE_DOMAIN = ".blob.core.windows.net"

# A token is renewed this long before its msft:expiry (the SDK's margin).
TOKEN_REFRESH_MARGIN_S = 60.0
# Token requests: attempts, the base of the exponential backoff, its cap, and the timeouts.
TOKEN_ATTEMPTS = 6
TOKEN_BACKOFF_BASE_S = 1.0
TOKEN_BACKOFF_MAX_S = 60.0
TOKEN_TIMEOUT_S = (10, 30)  # connect, read
_RETRIED_STATUSES = {429, 500, 502, 503, 504}


def sas_url() -> str:
    """The SAS API root, as the planetary-computer SDK's settings have it (``PC_SDK_SAS_URL``)."""
    import planetary_computer.settings

    return planetary_computer.settings.Settings.get().sas_url.rstrip("/")


def _subscription_key() -> str | None:
    import planetary_computer.settings

    return planetary_computer.settings.Settings.get().subscription_key


class PlanetaryComputerSigner:
    """SAS-signs Azure Blob Storage hrefs; other hrefs pass unchanged."""

    def __init__(self):
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}  # (account, container) -> (token, expiry)
        self._lock = threading.Lock()
        self._session = requests.Session()

    def sign(self, href: str) -> str:
        parsed = urlparse(href)
        if not (parsed.hostname or "").endswith(BLOB_STORAGE_DOMAIN) or "sig=" in parsed.query:
            return href
        account = parsed.hostname.split(".")[0]
        container = parsed.path.lstrip("/").split("/", 1)[0]
        token = self.token(account, container)
        return f"{href}{'&' if parsed.query else '?'}{token}"

    def forget(self, href: str) -> bool:
        parsed = urlparse(href)
        if not (parsed.hostname or "").endswith(BLOB_STORAGE_DOMAIN):
            return False
        key = (parsed.hostname.split(".")[0], parsed.path.lstrip("/").split("/", 1)[0])
        with self._lock:
            self._tokens.pop(key, None)
        return True

    def token(self, account: str, container: str) -> str:
        """A SAS token of the container valid for at least ``TOKEN_REFRESH_MARGIN_S`` more."""
        with self._lock:
            held = self._tokens.get((account, container))
            if held is not None and held[1] - time.time() > TOKEN_REFRESH_MARGIN_S:
                return held[0]
            token, expiry = self._request(account, container)
            self._tokens[(account, container)] = (token, expiry)
            return token

    def _request(self, account: str, container: str) -> tuple[str, float]:
        url = f"{sas_url()}/{account}/{container}"
        key = _subscription_key()
        headers = {"Ocp-Apim-Subscription-Key": key} if key else {}
        reason = ""
        for attempt in range(1, TOKEN_ATTEMPTS + 1):
            wait = None
            try:
                response = self._session.get(url, headers=headers, timeout=TOKEN_TIMEOUT_S)
            except requests.RequestException as exc:
                reason = type(exc).__name__
            else:
                if response.status_code == 200:
                    try:
                        body = response.json()
                        expiry = dt.datetime.fromisoformat(body["msft:expiry"].replace("Z", "+00:00"))
                        return body["token"], expiry.timestamp()
                    except (ValueError, KeyError, AttributeError):
                        reason = "an answer without a token"
                elif response.status_code in _RETRIED_STATUSES:
                    reason = f"HTTP {response.status_code}"
                    wait = _retry_after(response)
                else:
                    raise SourceUnavailable(
                        f"Planetary Computer's token service refused a token for {account}/{container} "
                        f"(HTTP {response.status_code})")
            if attempt < TOKEN_ATTEMPTS:
                backoff = min(TOKEN_BACKOFF_MAX_S, TOKEN_BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                time.sleep(max(backoff, wait or 0.0))
        raise SourceUnavailable(f"Planetary Computer's token service at {urlparse(url).netloc} failed "
                                f"{TOKEN_ATTEMPTS} times ({reason})")


def _retry_after(response: requests.Response) -> float | None:
    """Seconds asked for by ``Retry-After`` (delta-seconds only), capped at the backoff's cap."""
    value = response.headers.get("Retry-After", "").strip()
    return min(float(value), TOKEN_BACKOFF_MAX_S) if value.isdigit() else None


def mpc_shaped_source(name: str, url: str, signer: Signer | None = None, *, ephemeral_url: bool = False,
                      pgstac_order: bool = False) -> Source:
    """A source whose items look like MPC's (collections, asset keys, the "mpc" harmonisation and the
    reference's nearest resampling of MPC's RTC)."""
    signer = signer or NoSigning()
    return Source(
        name=name,
        s2=StacFeed(url, MPC_S2_COLLECTION, MPC_ASSET_KEYS, signer, ephemeral_url=ephemeral_url,
                    pgstac_order=pgstac_order),
        s1=StacFeed(url, MPC_S1_COLLECTION, MPC_ASSET_KEYS, signer, ephemeral_url=ephemeral_url,
                    pgstac_order=pgstac_order),
        harmonisation="mpc",
        s1_resampling="nearest",
    )


def mpc_source(url: str | None = None) -> Source:
    """Planetary Computer: sentinel-2-l2a and sentinel-1-rtc, SAS-signed per read."""
    return mpc_shaped_source("mpc", url or MPC_STAC_URL, PlanetaryComputerSigner())
