"""Earthdata Login for reads of ASF-hosted files (OPERA RTC-S1), done the way its users do it.

Credentials are found the way ``earthaccess`` finds them (its ``environment`` and ``netrc``
strategies), plus the reference's token file:

1. ``EARTHDATA_TOKEN``: an Earthdata Login bearer token;
2. ``EARTHDATA_USERNAME`` and ``EARTHDATA_PASSWORD``: earthaccess exchanges them for a token at
   Earthdata Login (``/api/users/find_or_create_token``);
3. a token file (``EARTHDATA_TOKEN_FILE``, default ``~/.edl_bearer_token`` as the reference) that
   only its owner may read;
4. ``~/.netrc`` (or ``NETRC``) with a ``machine urs.earthdata.nasa.gov`` entry, owner-only;
   earthaccess exchanges the login for a token as in 2.

Why the reads do not hand GDAL the URL and the token: CMR lists
``https://datapool.asf.alaska.edu/RTC/OPERA-S1/<file>``, which answers 307 to ASF's download
gateway on another host (asfadmin/thin-egress-app); the gateway takes the bearer token (or its
``asf-urs`` cookie) and answers 303 with a presigned S3 URL valid for about an hour (without
credentials: 302 to Earthdata Login). GDAL >= 3.10 does not forward ``Authorization`` to another
host (OSGeo/gdal#10857), so the token never reaches the gateway; a client that did forward it to
S3 would get 400 "Only one auth mechanism allowed". So here a ``requests`` session resolves the
redirects first, sending the token only to Earthdata and ASF hosts (as asf-search's
``ASFSession.rebuild_auth`` does), and stops at the first URL outside them: the presigned URL,
which GDAL reads with no credential at all. A presigned URL is reused until shortly before it
expires; a read refused with 403 drops it and resolves again (``forget``).

Secrets stay in memory: no log line, file, error message or URL in a log carries the token,
the password or a signature (``redact`` cuts query strings).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from tessera.errors import SourceUnavailable, UserError
from tessera.sources.stac import UnusableAsset

# The Earthdata Login server, and the domains that may see the token (asf-search's
# INTERNAL.AUTH_DOMAINS, with earthdatacloud.nasa.gov where ASF's cumulus gateway now lives).
# Tests point both at loopback stand-ins.
EDL_HOST = "urs.earthdata.nasa.gov"
AUTH_DOMAINS = ("asf.alaska.edu", "earthdata.nasa.gov", "earthdatacloud.nasa.gov")
DEFAULT_TOKEN_FILE = "~/.edl_bearer_token"
# A presigned URL is resolved again this long before it expires (a read takes a few requests).
PRESIGNED_MARGIN_S = 120.0
MAX_REDIRECTS = 10
RESOLVE_TIMEOUT_S = (10, 30)
RESOLVE_RETRY = Retry(total=5, backoff_factor=1.0, backoff_jitter=0.5, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=None, raise_on_status=False, respect_retry_after_header=True)

CREDENTIALS_HELP = (
    "set EARTHDATA_TOKEN to an Earthdata Login token (or EARTHDATA_USERNAME and EARTHDATA_PASSWORD), write the "
    "token to ~/.edl_bearer_token (chmod 600), or add 'machine urs.earthdata.nasa.gov login USER password PASS' "
    "to ~/.netrc (chmod 600)"
)


@dataclass(frozen=True)
class Credentials:
    """Where the credentials came from (``kind``, safe to print) and the bearer token (never print)."""

    kind: str
    token: str = ""

    def __repr__(self) -> str:  # a traceback or a debugger shows the kind only
        return f"Credentials(kind={self.kind!r})"


def credentials_kind() -> str | None:
    """Which credentials would be used, without contacting anyone (for ``check-source``)."""
    if os.environ.get("EARTHDATA_TOKEN", "").strip():
        return "token from EARTHDATA_TOKEN"
    if os.environ.get("EARTHDATA_USERNAME") and os.environ.get("EARTHDATA_PASSWORD"):
        return "username and password from EARTHDATA_USERNAME/EARTHDATA_PASSWORD"
    if _token_file().exists():
        return f"token file {_token_file()}"
    netrc_file = _netrc_file()
    if netrc_file.exists():
        return f"netrc {netrc_file}"
    return None


def _token_file() -> Path:
    return Path(os.environ.get("EARTHDATA_TOKEN_FILE") or DEFAULT_TOKEN_FILE).expanduser()


def _netrc_file() -> Path:
    return Path(os.environ.get("NETRC") or "~/.netrc").expanduser()


def _refuse_if_shared(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{what} {path} is readable by others (mode {mode:04o}): run chmod 600 {path}")


def login() -> Credentials:
    """The user's Earthdata Login bearer token, found as the module docstring says."""
    token = os.environ.get("EARTHDATA_TOKEN", "").strip()
    if token:
        return Credentials("token from EARTHDATA_TOKEN", _earthaccess_login("environment").strip())
    if os.environ.get("EARTHDATA_USERNAME") and os.environ.get("EARTHDATA_PASSWORD"):
        return Credentials("username and password from EARTHDATA_USERNAME/EARTHDATA_PASSWORD",
                           _earthaccess_login("environment"))
    token_file = _token_file()
    if token_file.exists():
        _refuse_if_shared(token_file, "Earthdata token file")
        token = token_file.read_text().strip()
        if not token:
            raise UserError(f"Earthdata token file {token_file} is empty: write your Earthdata Login token into it")
        return Credentials(f"token file {token_file}", token)
    netrc_file = _netrc_file()
    if netrc_file.exists():
        _refuse_if_shared(netrc_file, "netrc file")
        return Credentials(f"netrc {netrc_file}", _earthaccess_login("netrc", netrc_file))
    raise UserError(f"reading OPERA RTC-S1 needs Earthdata Login credentials: {CREDENTIALS_HELP}")


def _earthaccess_login(strategy: str, netrc_file: Path | None = None) -> str:
    """A bearer token from earthaccess's ``environment`` or ``netrc`` strategy against ``EDL_HOST``."""
    import earthaccess
    from earthaccess.exceptions import LoginAttemptFailure, LoginStrategyUnavailable
    from earthaccess.system import PROD, System

    system = System(PROD.cmr_base_url, PROD.status_url, PROD.status_api_url, EDL_HOST)
    auth = earthaccess.Auth()
    try:
        auth.login(strategy=strategy, system=system)
    except LoginStrategyUnavailable as exc:
        where = f"netrc file {netrc_file}" if netrc_file else "the environment"
        # earthaccess's message names the file and the host, never the password.
        raise UserError(f"{where} gives no Earthdata Login credentials ({exc}): {CREDENTIALS_HELP}") from None
    except LoginAttemptFailure:
        raise UserError(f"Earthdata Login ({EDL_HOST}) refused the username and password of "
                        f"{'netrc file ' + str(netrc_file) if netrc_file else 'EARTHDATA_USERNAME/EARTHDATA_PASSWORD'}: "
                        "check them at https://urs.earthdata.nasa.gov") from None
    except requests.RequestException as exc:
        raise SourceUnavailable(f"Earthdata Login at {EDL_HOST} did not answer ({type(exc).__name__})") from None
    if not auth.authenticated or not auth.token:
        raise UserError(f"Earthdata Login gave no token: {CREDENTIALS_HELP}")
    return auth.token["access_token"]


def may_see_token(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    edl = EDL_HOST.split(":")[0].lower()
    return host == edl or any(host == d or host.endswith("." + d) for d in AUTH_DOMAINS)


def presigned_expiry(url: str) -> float | None:
    """When an S3-style presigned URL stops working (X-Amz-Date + X-Amz-Expires), or None."""
    query = {k.lower(): v[0] for k, v in parse_qs(urlparse(url).query).items()}
    try:
        signed = datetime.strptime(query["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        return signed.timestamp() + int(query["x-amz-expires"])
    except (KeyError, ValueError):
        return None


class EarthdataResolver:
    """Turns an Earthdata-hosted href into a URL GDAL can read without credentials."""

    def __init__(self):
        self._credentials: Credentials | None = None
        self._resolved: dict[str, tuple[str, float]] = {}  # href -> (URL, reuse until)
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False  # no netrc auth or proxies from the environment: we say who sees what
        self._session.mount("https://", HTTPAdapter(max_retries=RESOLVE_RETRY))
        self._session.mount("http://", HTTPAdapter(max_retries=RESOLVE_RETRY))
        self._session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    @property
    def credentials(self) -> Credentials:
        if self._credentials is None:
            self._credentials = login()
        return self._credentials

    def resolve(self, href: str) -> str:
        with self._lock:
            held = self._resolved.get(href)
            if held is not None and held[1] > time.time():
                return held[0]
            url = self._follow(href)
            expiry = presigned_expiry(url)
            reuse_until = (expiry - PRESIGNED_MARGIN_S) if expiry is not None else time.time() + 600
            self._resolved[href] = (url, reuse_until)
            return url

    def forget(self, href: str) -> bool:
        with self._lock:
            return self._resolved.pop(href, None) is not None

    def hrefs_resolved_to(self, url: str) -> list[str]:
        """The hrefs whose resolution is ``url`` (the reader knows the URL it read, not the href)."""
        with self._lock:
            return [href for href, (resolved, _) in self._resolved.items() if resolved == url or href == url]

    def _follow(self, href: str) -> str:
        url = href
        for _ in range(MAX_REDIRECTS):
            headers = {"Authorization": f"Bearer {self.credentials.token}"} if may_see_token(url) else {}
            if not headers:
                return url  # outside Earthdata and ASF: a presigned URL (or a public file) for GDAL
            try:
                # GET, not HEAD: the gateway signs a HEAD's URL for HEAD only (a GET on it is 403).
                response = self._session.get(url, headers=headers, allow_redirects=False, stream=True,
                                             timeout=RESOLVE_TIMEOUT_S)
            except requests.RequestException as exc:
                raise SourceUnavailable(f"ASF's download service at {urlparse(url).hostname} failed "
                                        f"({type(exc).__name__})") from None
            with response:
                status = response.status_code
                if status in (301, 302, 303, 307, 308):
                    location = urljoin(url, response.headers.get("Location", ""))
                    if (urlparse(location).hostname or "") == EDL_HOST.split(":")[0]:
                        raise UserError(
                            f"ASF's download gateway ({urlparse(url).hostname}) sent the request to Earthdata Login: it "
                            f"did not accept the {self.credentials.kind} (expired token, or wrong login). Renew the token "
                            "at https://urs.earthdata.nasa.gov (Generate Token) or fix the credentials; "
                            + CREDENTIALS_HELP)
                    url = location
                    continue
                if status == 200:
                    return url  # served directly: GDAL reads the same URL (it holds no signature)
                if status in (404, 410):
                    raise UnusableAsset(f"{urlparse(href).path.rsplit('/', 1)[-1]} is not at ASF (HTTP {status})")
                if status in (401, 403):
                    raise UserError(_refusal(response, self.credentials.kind))
                raise SourceUnavailable(f"ASF's download service at {urlparse(url).hostname} answered HTTP {status}")
        raise SourceUnavailable(f"ASF's download service redirected more than {MAX_REDIRECTS} times")


def _refusal(response: requests.Response, kind: str) -> str:
    """One line for a 401/403 of the gateway: TEA answers a user who has not accepted a EULA or
    approved an application with JSON ``error_description`` and ``resolution_url``."""
    description, resolution = "", ""
    try:
        body = response.json()
        description = str(body.get("error_description") or body.get("error") or "")
        resolution = str(body.get("resolution_url") or "")
    except ValueError:
        pass
    reason = f": {description}" if description else ""
    fix = f"accept it at {resolution}" if resolution else (
        "in your Earthdata Login profile (Applications > Authorized Apps) approve 'ASF Data Search' / "
        "'Alaska Satellite Facility Data Access', then rerun")
    return f"ASF refused the read with the {kind} (HTTP {response.status_code}{reason}): {fix}"


