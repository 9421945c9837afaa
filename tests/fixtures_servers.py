"""Loopback stand-ins for Planetary Computer, Earth Search, ASF/NASA CMR and their file hosts.

One HTTP origin (``Origin``) answers as
* a STAC API with MPC's paging (POST ``next`` links whose body is the whole query plus ``token``),
* a STAC API with Earth Search's paging (``merge: false`` links whose body holds only ``next``,
  a ``next`` link on every non-empty page, then an empty last page; a query-less body is served
  unfiltered, which is what the real service does with it),
* MPC's SAS token API and Azure Blob Storage that accepts only unrevoked tokens (GDAL reaches the
  real ``*.blob.core.windows.net`` hrefs through the origin as an HTTP proxy: ``GDAL_HTTP_PROXY``),
* a file host with Earthdata-style authentication and injected faults (HTTP 500s, stalls).
``Cmr`` is NASA CMR's ``granules.umm_json`` search over HTTPS (asf-search only speaks HTTPS).

Items are the REAL fixture JSON (``shared/fixtures/stac`` beside the checkout) re-dressed: ids, times, footprints,
projection fields and hrefs are replaced by those of synthetic scenes (the demo generator's COGs),
everything else stays as the services returned it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ctypes
import itertools
import json
import re
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pystac
import rasterio
import shapely
import uvicorn
from pystac.extensions.projection import ProjectionExtension
from shapely.geometry import shape
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from tessera.sources.aws import EARTH_SEARCH_ASSET_KEYS

from conftest import STAC_FIXTURES as FIXTURES
MPC_ROOT = "https://planetarycomputer.microsoft.com/api/stac/v1"
EARTH_SEARCH_ROOT = "https://earth-search.aws.element84.com/v1"
MPC_S2_BLOB = ("sentinel2l2a01", "sentinel2-l2")
MPC_S1_BLOB = ("sentinel1euwestrtc", "sentinel1-grd-rtc")
OPERA_CONCEPT_ID = "C2777436413-ASF"
# ASF's hosts, each on its own loopback address (port 443, as the real ones: earthaccess compares
# the Earthdata Login host name without a port, so the login server must not need one).
ASF_ADDRESSES = {"datapool": "127.0.0.42", "gateway": "127.0.0.43", "urs": "127.0.0.44", "s3": "127.0.0.45"}


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text())


def clear_gdal_http_cache() -> None:
    """Forget what GDAL's /vsicurl/ remembers per URL (file sizes, blocks, and failures: a URL that
    once answered 401 fails again without a request). rasterio does not expose VSICurlClearCache."""
    libraries = Path(rasterio.__file__).parent.parent / "rasterio.libs"
    ctypes.CDLL(str(next(libraries.glob("libgdal*.so*")))).VSICurlClearCache()


# --- servers -------------------------------------------------------------------------------------


class LoopbackServer:
    """An ASGI app under uvicorn in a daemon thread on 127.0.0.1 (HTTPS with ``tls=(cert, key)``), or
    on another loopback address and port (``host``, ``port``): distinct addresses are distinct hosts
    to clients, so a redirect between them is a cross-host redirect."""

    def __init__(self, app, tls: tuple[Path, Path] | None = None, host: str = "127.0.0.1", port: int = 0):
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        scheme = "https" if tls else "http"
        default = 443 if tls else 80
        self.host = host if self.port == default else f"{host}:{self.port}"
        self.url = f"{scheme}://{self.host}"
        # Clients keep connections alive (GDAL's curl pool): do not wait for them when stopping.
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1,
                                ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "loopback server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=" + ",".join(f"IP:{ip}" for ip in ("127.0.0.1", *ASF_ADDRESSES.values()))],
        check=True, capture_output=True,
    )
    return cert, key


@dataclass
class Fault:
    """What a file path answers instead of its bytes: ``status`` for the next ``times`` requests,
    or a stall of ``delay`` seconds before every answer."""

    status: int | None = None
    times: int = 0
    delay: float = 0.0


@dataclass
class Served:
    """A file behind a URL path, and who may read it."""

    path: Path
    bearer: str | None = None  # either credential is accepted when given
    basic: tuple[str, str] | None = None


@dataclass
class Traffic:
    """What the origin answered: (host, path, status, body bytes) per request, and request bodies."""

    responses: list = field(default_factory=list)
    search_bodies: list = field(default_factory=list)
    sas_requests: list = field(default_factory=list)

    def body_bytes(self, path_contains: str = "") -> int:
        return sum(n for _, path, _, n in self.responses if path_contains in path)

    def statuses(self, path_contains: str) -> Counter:
        return Counter(status for _, path, status, _ in self.responses if path_contains in path)


class StacApi:
    """Item search over a list of item dicts, paged the MPC way or the Earth Search way."""

    def __init__(self, root: str, real_root: str, landing_fixture: str, paging: str, items: list[dict]):
        self.root, self.paging = root, paging
        self.landing = json.loads((FIXTURES / landing_fixture).read_text().replace(real_root, root))
        self.items = sorted(items, key=lambda d: (d["properties"]["datetime"], d["id"]), reverse=True)
        self.max_page = 1000

    def search(self, body: dict) -> dict:
        token = body.get("token") or body.get("next")
        matching = [d for d in self.items if _matches(d, body)]
        start = 0
        if token:
            last_id = token.split(":")[-1] if self.paging == "mpc" else token.split(",")[1]
            start = next(i for i, d in enumerate(matching) if d["id"] == last_id) + 1
        limit = min(int(body.get("limit", 10)), self.max_page)
        page = matching[start:start + limit]
        links = [{"rel": "root", "href": f"{self.root}/", "type": "application/json"}]
        if self.paging == "mpc":
            if start + limit < len(matching):
                query = {k: v for k, v in body.items() if k != "token"}
                links.append({"rel": "next", "type": "application/geo+json", "method": "POST", "href": f"{self.root}/search",
                              "body": {**query, "token": f"next:{page[-1]['collection']}:{page[-1]['id']}"}})
            return {"type": "FeatureCollection", "features": page, "links": links}
        if page:
            last = page[-1]
            links.append({"rel": "next", "type": "application/geo+json", "method": "POST", "href": f"{self.root}/search",
                          "merge": False,
                          "body": {"next": f"{last['properties']['datetime']},{last['id']},{last['collection']}"}})
        return {"type": "FeatureCollection", "numberMatched": len(matching), "numberReturned": len(page),
                "context": {"limit": limit, "matched": len(matching), "returned": len(page)},
                "features": page, "links": links}


def _matches(item: dict, body: dict) -> bool:
    if "collections" in body and item["collection"] not in body["collections"]:
        return False
    if "bbox" in body and not shape(item["geometry"]).intersects(shapely.box(*body["bbox"])):
        return False
    if "datetime" in body:
        start, _, end = body["datetime"].partition("/")
        when = _time(item["properties"]["datetime"])
        if (start not in ("", "..") and when < _time(start)) or (end not in ("", "..") and when > _time(end)):
            return False
    return True


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Origin:
    """The plain-HTTP origin: two STAC APIs, MPC's SAS API, blob storage and a file host."""

    def __init__(self):
        self.traffic = Traffic()
        self.mpc: StacApi | None = None
        self.earth_search: StacApi | None = None
        self.files: dict[str, Served] = {}  # URL path -> file
        self.blobs: dict[tuple[str, str, str], Path] = {}  # (account, container, blob path) -> file
        self.faults: dict[str, Fault] = {}  # URL path -> fault
        self.valid_tokens: set[str] = set()
        self.issued_signatures: list[str] = []
        self.accept_new_tokens = True
        self.revoke_after_blob_reads: int | None = None  # revoke every token after this many blob reads
        self.subscription_keys: list[str | None] = []
        # The SAS API throttles (429 with Retry-After) and fails (5xx) like the real one; its
        # tokens expire ("msft:expiry", the "se" field) and blob storage refuses them after that.
        self.sas_throttle = 0  # the next N token requests answer 429
        self.sas_retry_after = "1"
        self.sas_errors = 0  # the next N token requests answer 503
        self.token_lifetime = timedelta(hours=1)
        self.token_expiry: dict[str, datetime] = {}
        # A token is a container SAS ("sr=c" in the documented response, shared/fixtures/stac/
        # mpc-sas-token-response-docs-example.json, asked for at /token/{account}/{container}):
        # storage refuses it for another container's blobs (403, its signature does not match).
        self.token_scope: dict[str, tuple[str, str]] = {}
        # The SAS API's and blob storage's clock; the storage judges a token by its own clock, not
        # the client's (clock skew gives 403s: learn.microsoft.com/azure/storage/common/
        # storage-sas-overview, "Be careful with SAS start time"). A test moves it on, e.g. after some blob reads
        # (``advance_clock_after_blob_reads``: (reads, by how much)), to play a read that took an
        # hour without waiting for it: deterministically, unlike short-lived tokens.
        self.clock_offset = timedelta(0)
        self.advance_clock_after_blob_reads: tuple[int, timedelta] | None = None
        self.server = LoopbackServer(self)

    @property
    def url(self) -> str:
        return self.server.url

    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock_offset

    def revoke_tokens(self) -> None:
        self.valid_tokens.clear()

    async def __call__(self, scope, receive, send):
        request = Request(scope, receive)
        host = request.headers.get("host", "").split(":")[0]
        response = await self._answer(request, host, scope["path"])
        status, sent = None, 0

        async def counting_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]  # 206 for a range, whatever the Response object says
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        await response(scope, receive, counting_send)
        self.traffic.responses.append((host, scope["path"], status, sent))

    async def _answer(self, request: Request, host: str, path: str) -> Response:
        fault = self.faults.get(path)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.times > 0:
                fault.times -= 1
                return PlainTextResponse("injected fault", status_code=fault.status)
        if host.endswith(".blob.core.windows.net"):
            return self._blob(request, host.split(".")[0], path)
        for api, prefix in ((self.mpc, "/mpc/api/stac/v1"), (self.earth_search, "/earth-search/v1")):
            if api is not None and path.startswith(prefix):
                return await self._stac(request, api, path[len(prefix):].rstrip("/"))
        if path.startswith("/mpc/api/sas/v1/token/"):
            return self._sas_token(request, path[len("/mpc/api/sas/v1/token/"):])
        if path in self.files:
            return self._file(request, self.files[path])
        return PlainTextResponse("not found", status_code=404)

    async def _stac(self, request: Request, api: StacApi, rest: str) -> Response:
        if rest == "":
            return JSONResponse(api.landing)
        if rest == "/search":
            body = await request.json() if request.method == "POST" else dict(request.query_params)
            self.traffic.search_bodies.append(body)
            return JSONResponse(api.search(body), media_type="application/geo+json")
        return PlainTextResponse("not found", status_code=404)

    def _sas_token(self, request: Request, account_and_container: str) -> Response:
        self.subscription_keys.append(request.headers.get("ocp-apim-subscription-key"))
        self.traffic.sas_requests.append(request.url.path)
        # Throttling: the SAS API is rate limited per client IP; the planetary-computer SDK retries
        # 429 (and 5xx) for this reason (microsoft/planetary-computer-sdk-for-python,
        # planetary_computer/sas.py get_token: Retry(status_forcelist=[429, 500, 502, 503, 504])),
        # and urllib3 honours Retry-After.
        if self.sas_throttle > 0:
            self.sas_throttle -= 1
            return PlainTextResponse("Rate limit is exceeded. Try again later.", status_code=429,
                                     headers={"Retry-After": self.sas_retry_after})
        if self.sas_errors > 0:
            self.sas_errors -= 1
            return PlainTextResponse("upstream unavailable", status_code=503)
        response = fixture("mpc-sas-token-response-docs-example.json")
        signature = secrets.token_urlsafe(16)
        self.issued_signatures.append(signature)
        if self.accept_new_tokens:
            self.valid_tokens.add(signature)
        expiry = self.now() + self.token_lifetime
        self.token_expiry[signature] = expiry
        account, _, container = account_and_container.strip("/").partition("/")
        self.token_scope[signature] = (account, container)
        response["msft:expiry"] = expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # The documented example with its redacted signature replaced by a live one.
        query = parse_qs(response["token"], keep_blank_values=True)
        query["sig"] = [signature]
        query["se"] = [response["msft:expiry"]]
        response["token"] = "&".join(f"{key}={values[0]}" for key, values in query.items())
        return JSONResponse(response)

    def _blob(self, request: Request, account: str, path: str) -> Response:
        container, _, blob = path.lstrip("/").partition("/")
        signature = parse_qs(request.url.query).get("sig", [None])[0]
        expired = signature in self.token_expiry and self.now() > self.token_expiry[signature]
        other_container = self.token_scope.get(signature, (account, container)) != (account, container)
        if signature not in self.valid_tokens or expired or other_container:
            # Azure answers an expired or revoked SAS with 403 AuthenticationFailed ("Signature not
            # valid in the specified time frame: Start ... Expiry ... Current ...", quoted in
            # microsoft/AzureStorageExplorer#3219); a token for another resource with "Signature did
            # not match" (Azure/azure-storage-ruby#217).
            return Response("<Error><Code>AuthenticationFailed</Code></Error>", status_code=403, media_type="application/xml")
        file = self.blobs.get((account, container, blob))
        if file is None:
            return PlainTextResponse("BlobNotFound", status_code=404)
        if self.advance_clock_after_blob_reads is not None:
            reads, by = self.advance_clock_after_blob_reads
            self.advance_clock_after_blob_reads = (reads - 1, by) if reads > 1 else None
            if reads <= 1:
                self.clock_offset += by
        if self.revoke_after_blob_reads is not None:
            self.revoke_after_blob_reads -= 1
            if self.revoke_after_blob_reads <= 0:
                self.revoke_after_blob_reads = None
                self.valid_tokens.clear()
        return FileResponse(file)

    def _file(self, request: Request, served: Served) -> Response:
        accepted = []
        if served.bearer is not None:
            accepted.append(f"Bearer {served.bearer}")
        if served.basic is not None:
            accepted.append("Basic " + base64.b64encode(":".join(served.basic).encode()).decode())
        if accepted and request.headers.get("authorization") not in accepted:
            return PlainTextResponse("Unauthorized", status_code=401)
        return FileResponse(served.path)


class Cmr:
    """NASA CMR ``POST /search/granules.umm_json`` over granule records, paged with CMR-Search-After."""

    def __init__(self, certificate: tuple[Path, Path]):
        self.granules: list[dict] = []
        self.requests: list[dict] = []
        # CMR sometimes answers a page with fewer items than asked while counting more hits, and
        # its CMR-Search-After still points past the whole page: the missing items are lost to the
        # client (asfadmin/Discovery-asf_search, asf_search/search/search_generator.py: "CMR
        # returned page of incomplete results", logged, and searchComplete stays False).
        self.short_pages = 0  # the next N pages lose their last item
        self.server = LoopbackServer(self, tls=certificate)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def __call__(self, scope, receive, send):
        request = Request(scope, receive)
        if scope["path"] != "/search/granules.umm_json":
            await PlainTextResponse("not found", status_code=404)(scope, receive, send)
            return
        form = parse_qs((await request.body()).decode())
        self.requests.append(form)
        west, south, east, north = map(float, form["bounding_box"][0].split(","))
        start, end = (_time(t) for t in form["temporal"][0].split(",")[:2])
        matching = [g for g in self.granules if g["umm"]["CollectionReference"]["ShortName"] in form["shortName"]
                    and _granule_footprint(g).intersects(shapely.box(west, south, east, north))
                    and start <= _time(g["umm"]["TemporalExtent"]["RangeDateTime"]["BeginningDateTime"]) <= end]
        matching.sort(key=lambda g: g["umm"]["GranuleUR"])
        matching.sort(key=lambda g: g["umm"]["TemporalExtent"]["RangeDateTime"]["EndingDateTime"], reverse=True)
        after = request.headers.get("cmr-search-after")
        offset = json.loads(after)[0] if after else 0
        size = int(form["page_size"][0])
        page = matching[offset:offset + size]
        if self.short_pages > 0 and len(page) > 1:
            self.short_pages -= 1
            page = page[:-1]
        headers = {"CMR-Hits": str(len(matching))}
        if offset + size < len(matching):
            headers["CMR-Search-After"] = json.dumps([offset + size])
        body = {"hits": len(matching), "took": 3, "items": page}
        await JSONResponse(body, headers=headers, media_type="application/vnd.nasa.cmr.umm_results+json")(scope, receive, send)


class Asf:
    """ASF's download chain for OPERA products, one loopback host per real host (``ASF_ADDRESSES``),
    HTTPS on port 443 like the real ones.

    * datapool (``datapool.asf.alaska.edu``): ``/RTC/OPERA-S1/<file>`` answers 307 to the gateway's
      ``/OPERA/OPERA_L2_RTC-S1/<granule>/<file>``, for GET and HEAD alike, without credentials.
    * gateway (ASF's thin-egress-app, ``cumulus.asf.alaska.edu`` / ``cumulus.asf.earthdatacloud.nasa.gov``),
      after asfadmin/thin-egress-app src/thin_egress_app/app.py:
      - GET with ``Authorization: Bearer <EDL token>`` (``get_profile``: bearer checked with EDL)
        or its ``asf-urs`` cookie (``JWT_COOKIE_NAME = "asf-urs"``, set on a bearer success by
        ``get_header_to_set_auth_cookie``) answers 303 to a presigned S3 GET URL valid
        ``3600 - offset`` s (``try_download_from_bucket``: ``make_redirect(presigned_url, ..., 303)``);
      - without credentials, or with a token EDL rejects, 302 to Earthdata Login's
        ``/oauth/authorize`` (``do_auth_and_return``);
      - a user who has not accepted a EULA: 403 with JSON ``error_description`` and
        ``resolution_url`` (``_get_profile_and_response_from_bearer``, ``EulaException``);
      - HEAD needs no credentials and answers 303 to a URL presigned for HEAD only
        (``dynamic_url_head`` -> ``try_download_head``: ``get_presigned_url(..., "HEAD")``).
    * login server (``urs.earthdata.nasa.gov``): ``/oauth/authorize`` without a session answers 401
      "HTTP Basic: Access denied." (nsidc/earthaccess#212); ``POST /api/users/find_or_create_token``
      with HTTP Basic answers the user's token, as earthaccess's ``Auth._find_or_create_token`` uses it.
    * S3: a presigned URL works for its method until ``X-Amz-Date + X-Amz-Expires`` (then 403
      "Request has expired"); the other method is 403 SignatureDoesNotMatch; any ``Authorization``
      header alongside the query signature is 400 "Only one auth mechanism allowed"
      (asfadmin/Discovery-asf_search#46; nasa/harmony-service-lib-py#55; oras-project/oras-java#334).
    """

    BUCKET = "asf-cumulus-prod-opera-products"

    def __init__(self, certificate: tuple[Path, Path], *, username: str, password: str, token: str):
        self.users = {username: (password, token)}
        self.tokens = {token: username}
        self.eula_pending: set[str] = set()  # tokens of users who must accept a EULA first
        self.cookies: set[str] = set()
        self.objects: dict[str, Path] = {}  # "OPERA_L2_RTC-S1/<granule>/<file>" -> file
        self.url_lifetime_s = 3600
        self.requests: list[tuple[str, str, str, dict]] = []  # (host, method, path, headers)
        self._secret = secrets.token_bytes(16)
        self.servers = {name: LoopbackServer(self._app(name), tls=certificate, host=address, port=443)
                        for name, address in ASF_ADDRESSES.items()}

    def __enter__(self):
        for server in self.servers.values():
            server.__enter__()
        return self

    def __exit__(self, *exc):
        for server in self.servers.values():
            server.__exit__(*exc)

    def host(self, name: str) -> str:
        return self.servers[name].host

    def add(self, granule: str, file_name: str, path: Path) -> str:
        """Publish a file of a granule; returns its datapool URL (as CMR lists it)."""
        self.objects[f"OPERA_L2_RTC-S1/{granule}/{file_name}"] = path
        return f"https://{self.host('datapool')}/RTC/OPERA-S1/{file_name}"

    def cumulus_url(self, granule: str, file_name: str) -> str:
        """The newer form CMR lists: the gateway directly."""
        return f"https://{self.host('gateway')}/OPERA/OPERA_L2_RTC-S1/{granule}/{file_name}"

    def seen(self, name: str) -> list[tuple[str, str, dict]]:
        return [(method, path, headers) for host, method, path, headers in self.requests if host == name]

    def _app(self, name: str):
        handler = getattr(self, f"_{name}")

        async def app(scope, receive, send):
            request = Request(scope, receive)
            self.requests.append((name, request.method, request.url.path + ("?" + request.url.query if request.url.query else ""),
                                  {k.lower(): v for k, v in request.headers.items()}))
            response = await handler(request)
            await response(scope, receive, send)

        return app

    async def _datapool(self, request: Request) -> Response:
        prefix = "/RTC/OPERA-S1/"
        path = request.url.path
        if not path.startswith(prefix):
            return PlainTextResponse("Not Found", status_code=404)
        file_name = path[len(prefix):]
        granule = re.sub(r"(_VV|_VH|_mask)\.tif$|\.h5$", "", file_name)
        return Response(status_code=307, headers={"Location": self.cumulus_url(granule, file_name)})

    async def _gateway(self, request: Request) -> Response:
        prefix = "/OPERA/"
        key = request.url.path[len(prefix):] if request.url.path.startswith(prefix) else None
        if key is None or key not in self.objects:
            return PlainTextResponse("File not found", status_code=404)
        if request.method == "HEAD":
            return Response(status_code=303, headers={"Location": self._presign("HEAD", key)})
        headers = {}
        authorization = request.headers.get("authorization", "")
        cookie = request.cookies.get("asf-urs")
        if authorization.lower().startswith("bearer "):
            token = authorization.split(None, 1)[1]
            if token not in self.tokens:
                return self._to_login(request)
            if token in self.eula_pending:
                return JSONResponse({"error": "invalid_token", "status_code": 403,
                                     "error_description": "EULA Acceptance Failure",
                                     "resolution_url": f"https://{self.host('urs')}/approve_app?client_id=BO_n7nTIlMljdvU6kRRB3g"},
                                    status_code=403)
            session = secrets.token_urlsafe(24)
            self.cookies.add(session)
            headers["Set-Cookie"] = f"asf-urs={session}; Path=/; Secure; HttpOnly"
        elif cookie not in self.cookies:
            return self._to_login(request)
        headers["Location"] = self._presign("GET", key)
        headers["Cache-Control"] = f"private, max-age={self.url_lifetime_s - 60}"
        return Response(status_code=303, headers=headers)

    def _to_login(self, request: Request) -> Response:
        state = request.url.path
        return Response(status_code=302, headers={"Location": (
            f"https://{self.host('urs')}/oauth/authorize?splash=false&client_id=BO_n7nTIlMljdvU6kRRB3g&response_type=code"
            f"&redirect_uri=https%3A%2F%2F{self.host('gateway')}%2Flogin&state={state}")})

    async def _urs(self, request: Request) -> Response:
        if request.url.path == "/api/users/find_or_create_token" and request.method == "POST":
            user = _basic_user(request.headers.get("authorization", ""))
            if user is None or self.users.get(user[0], (None,))[0] != user[1]:
                return JSONResponse({"error": "invalid_credentials",
                                     "error_description": "Invalid user credentials"}, status_code=401)
            token = self.users[user[0]][1]
            return JSONResponse({"access_token": token, "token_type": "Bearer",
                                 "expiration_date": (datetime.now(UTC) + timedelta(days=60)).strftime("%m/%d/%Y")})
        if request.url.path == "/oauth/authorize":
            return PlainTextResponse("HTTP Basic: Access denied.", status_code=401)
        return PlainTextResponse("Not Found", status_code=404)

    def _signature(self, method: str, key: str, date: str, expires: str) -> str:
        return hmac.new(self._secret, f"{method}\n{key}\n{date}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def _presign(self, method: str, key: str) -> str:
        date = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        expires = str(self.url_lifetime_s)
        query = (f"A-userid=alice&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIATEST%2F{date[:8]}%2Fus-west-2%2Fs3%2Faws4_request"
                 f"&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host"
                 f"&X-Amz-Security-Token={secrets.token_urlsafe(12)}&X-Amz-Signature={self._signature(method, key, date, expires)}")
        return f"https://{self.host('s3')}/{self.BUCKET}/{key}?{query}"

    async def _s3(self, request: Request) -> Response:
        query = {k: v for k, v in request.query_params.items()}
        bucket, _, key = request.url.path.lstrip("/").partition("/")
        if "X-Amz-Signature" in query and "authorization" in request.headers:
            return _s3_error(400, "InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm query "
                             "parameter, Signature query string parameter or the Authorization header should be specified")
        if "X-Amz-Signature" not in query or bucket != self.BUCKET:
            return _s3_error(403, "AccessDenied", "Access Denied")
        method = "HEAD" if request.method == "HEAD" else "GET"
        if not hmac.compare_digest(query["X-Amz-Signature"],
                                   self._signature(method, key, query.get("X-Amz-Date", ""), query.get("X-Amz-Expires", ""))):
            return _s3_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the "
                             "signature you provided. Check your key and signing method.")
        signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if datetime.now(UTC) > signed + timedelta(seconds=int(query["X-Amz-Expires"])):
            return _s3_error(403, "AccessDenied", "Request has expired")
        if key not in self.objects:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return FileResponse(self.objects[key])


def _basic_user(authorization: str) -> tuple[str, str] | None:
    if not authorization.lower().startswith("basic "):
        return None
    user, _, password = base64.b64decode(authorization.split(None, 1)[1]).decode().partition(":")
    return user, password


def _s3_error(status: int, code: str, message: str) -> Response:
    return Response(f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>",
                    status_code=status, media_type="application/xml")


def _granule_footprint(granule: dict):
    points = granule["umm"]["SpatialExtent"]["HorizontalSpatialDomain"]["Geometry"]["GPolygons"][0]["Boundary"]["Points"]
    return shapely.Polygon([(p["Longitude"], p["Latitude"]) for p in points])


# --- re-dressing synthetic items as real ones ----------------------------------------------------


def _replace_links(item: dict, real_root: str, root: str) -> dict:
    return json.loads(json.dumps(item).replace(real_root, root))


def _epsg(scene: pystac.Item) -> int:
    # pystac reads the demo's proj:epsg as projection v2's proj:code; the real items say proj:epsg.
    return ProjectionExtension.ext(scene).epsg


def _footprint_and_time(target: dict, scene: pystac.Item) -> None:
    target["id"] = scene.id
    target["geometry"] = scene.geometry
    target["bbox"] = scene.bbox
    target["properties"]["datetime"] = pystac.utils.datetime_to_str(scene.datetime)


def mpc_s2_item(scene: pystac.Item, root: str) -> dict:
    """MPC's 2022 baseline-04.00 item re-dressed as ``scene``; assets on the MPC blob host."""
    item = _replace_links(fixture("mpc-sentinel-2-l2a-item-2022-06-12-baseline-04.00.json"), MPC_ROOT, root)
    _footprint_and_time(item, scene)
    for key in ("platform", "s2:mgrs_tile", "eo:cloud_cover", "s2:processing_baseline",
                "sat:relative_orbit", "sat:orbit_state", "s2:product_uri"):
        item["properties"][key] = scene.properties[key]
    item["properties"]["proj:epsg"] = _epsg(scene)
    account, container = MPC_S2_BLOB
    for key, asset in item["assets"].items():
        if asset["href"].startswith(f"https://{account}.blob.core.windows.net/"):
            asset["href"] = f"http://{account}.blob.core.windows.net/{container}/{scene.id}/{key}.tif"
        if key in scene.assets:
            for field_name in ("proj:bbox", "proj:shape", "proj:transform"):
                asset[field_name] = scene.assets[key].extra_fields[field_name]
    return item


def mpc_s1_item(scene: pystac.Item, root: str) -> dict:
    item = _replace_links(fixture("mpc-sentinel-1-rtc-item-2025-03-11.json"), MPC_ROOT, root)
    _footprint_and_time(item, scene)
    for key, value in scene.properties.items():
        if key in item["properties"] and key != "datetime":
            item["properties"][key] = value
    item["properties"]["proj:epsg"] = _epsg(scene)
    account, container = MPC_S1_BLOB
    for key in ("vv", "vh"):
        item["assets"][key]["href"] = f"http://{account}.blob.core.windows.net/{container}/{scene.id}/{key}.tif"
    return item


def earth_search_s2_item(scene: pystac.Item, root: str, href_of) -> dict:
    """Earth Search's 2023 item re-dressed as ``scene``; ``href_of(band)`` is the URL of each band."""
    item = _replace_links(fixture("earthsearch-sentinel-2-l2a-item-2023-10-08-S2A_13TDE.json"), EARTH_SEARCH_ROOT, root)
    _footprint_and_time(item, scene)
    for key in ("eo:cloud_cover", "s2:processing_baseline"):
        item["properties"][key] = scene.properties[key]
    item["properties"]["proj:epsg"] = _epsg(scene)
    item["properties"]["platform"] = scene.properties["platform"].lower()
    item["properties"]["earthsearch:boa_offset_applied"] = scene.properties["s2:processing_baseline"] >= "04.00"
    item["properties"]["grid:code"] = f"MGRS-{scene.properties['s2:mgrs_tile']}"
    for band, key in EARTH_SEARCH_ASSET_KEYS.items():
        item["assets"][key]["href"] = href_of(band)
        item["assets"][key]["proj:shape"] = scene.assets[band].extra_fields["proj:shape"]
        item["assets"][key]["proj:transform"] = scene.assets[band].extra_fields["proj:transform"]
    return item


_granule_numbers = itertools.count(2810724460)


def granule_name(scene: pystac.Item, burst: str) -> str:
    when = scene.datetime.astimezone(UTC)
    return f"OPERA_L2_RTC-S1_{burst.replace('_', '-')}_{when:%Y%m%dT%H%M%S}Z_{when + timedelta(hours=7):%Y%m%dT%H%M%S}Z_S1A_30_v1.0"


def opera_granule(scene: pystac.Item, hrefs: dict[str, str], burst: str) -> dict:
    """The OPERA RTC-S1 UMM-G record re-dressed as ``scene``; ``hrefs`` maps "_VV.tif" etc. to URLs."""
    record = fixture("cmr-umm-g-opera-l2-rtc-s1-granule-G2810724460-ASF.json")
    old_name = record["umm"]["GranuleUR"]
    when = scene.datetime.astimezone(UTC)
    name = granule_name(scene, burst)
    text = json.dumps(record).replace(old_name, name)
    record = json.loads(text)
    record["meta"]["concept-id"] = f"G{next(_granule_numbers)}-ASF"
    record["meta"]["collection-concept-id"] = OPERA_CONCEPT_ID
    umm = record["umm"]
    umm["TemporalExtent"]["RangeDateTime"] = {
        "BeginningDateTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "EndingDateTime": (when + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    ring = shapely.geometry.polygon.orient(shape(scene.geometry)).exterior.coords
    umm["SpatialExtent"]["HorizontalSpatialDomain"]["Geometry"]["GPolygons"][0]["Boundary"]["Points"] = [
        {"Longitude": lon, "Latitude": lat} for lon, lat in ring]
    for attribute in umm["AdditionalAttributes"]:
        if attribute["Name"] == "ASCENDING_DESCENDING":
            attribute["Values"] = [scene.properties["sat:orbit_state"].upper()]
        elif attribute["Name"] == "OPERA_BURST_ID":
            attribute["Values"] = [burst]
        elif attribute["Name"] == "PATH_NUMBER":
            attribute["Values"] = [str(scene.properties["sat:relative_orbit"])]
    for related in umm["RelatedUrls"]:
        for suffix, href in hrefs.items():
            if related["Type"] == "GET DATA" and related["URL"].endswith(suffix):
                related["URL"] = href
    return record


# --- the demo's scenes as MPC, Earth Search and OPERA products -----------------------------------


def _write_like(template: Path, values, out: Path, nodata) -> Path:
    """A COG with ``template``'s grid and layout holding ``values``."""
    with rasterio.open(template) as src:
        profile = {"driver": "COG", "width": src.width, "height": src.height, "count": 1, "dtype": values.dtype,
                   "crs": src.crs, "transform": src.transform, "nodata": nodata, "compress": "deflate",
                   "blocksize": 128, "overview_count": 2}
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(values, 1)
    return out


def _earth_search_band(scene: pystac.Item, band: str, folder: Path) -> Path:
    """The band as Earth Search stores it: the baseline-04.00 offset already removed from the DN (as
    the reference's rule has it: values >= 1000 lose 1000)."""
    source = Path(scene.assets[band].get_absolute_href())
    if band == "SCL" or scene.properties["s2:processing_baseline"] < "04.00":
        return source
    with rasterio.open(source) as src:
        values = src.read(1)
    return _write_like(source, np.where(values >= 1000, values - 1000, values).astype(values.dtype),
                       folder / scene.id / f"{band}.tif", nodata=0)


def _raw_path(origin: Origin, scene: pystac.Item, band: str) -> str:
    path = f"/sentinel-cogs/sentinel-s2-l2a-cogs/older/{scene.id}/{EARTH_SEARCH_ASSET_KEYS[band]}.tif"
    origin.files[path] = Served(Path(scene.assets[band].get_absolute_href()))
    return path


def _opera_mask(scene: pystac.Item, folder: Path) -> Path:
    """A mask with no layover or shadow, so that the burst's pixels equal the scene's."""
    vv = Path(scene.assets["vv"].get_absolute_href())
    with rasterio.open(vv) as src:
        shape_ = src.shape
    return _write_like(vv, np.zeros(shape_, np.uint8), folder / scene.id / "mask.tif", nodata=255)


@dataclass
class Published:
    """Where the demo's scenes were published."""

    scenes: list[pystac.Item]
    mpc_url: str
    earth_search_url: str
    cmr_host: str
    earthdata_token: str
    opera_paths: dict[str, dict[str, str]]  # scene id -> layer suffix -> URL path


def publish(catalog_json: Path, folder: Path, origin: Origin, cmr: Cmr, earthdata_token: str, asf: Asf | None = None) -> Published:
    """Serve every scene of a demo catalog as an MPC item (signed blobs), an Earth Search S2 item (and
    a Landsat item of another collection, which a query-less page would return) and an OPERA burst."""
    scenes = sorted(pystac.Catalog.from_file(str(catalog_json)).get_items(recursive=True), key=lambda s: (s.datetime, s.id))
    s2 = [s for s in scenes if s.collection_id == "sentinel-2-l2a"]
    s1 = [s for s in scenes if s.collection_id == "sentinel-1-rtc"]

    mpc_root = f"{origin.url}/mpc/api/stac/v1"
    origin.mpc = StacApi(mpc_root, MPC_ROOT, "mpc-landing-page-2025-03-12.json", "mpc",
                         [mpc_s2_item(s, mpc_root) for s in s2] + [mpc_s1_item(s, mpc_root) for s in s1])
    for scenes_of, (account, container) in ((s2, MPC_S2_BLOB), (s1, MPC_S1_BLOB)):
        for scene in scenes_of:
            for key, asset in scene.assets.items():
                origin.blobs[(account, container, f"{scene.id}/{key}.tif")] = Path(asset.get_absolute_href())

    es_root = f"{origin.url}/earth-search/v1"
    es_items = []
    for scene in s2:
        def href_of(band, scene=scene):
            path = f"/sentinel-cogs/sentinel-s2-l2a-cogs/{scene.id}/{EARTH_SEARCH_ASSET_KEYS[band]}.tif"
            origin.files[path] = Served(_earth_search_band(scene, band, folder / "earth-search"))
            return origin.url + path
        es_items.append(earth_search_s2_item(scene, es_root, href_of))
    landsat = next(f for f in fixture("earthsearch-search-s2l2a-landsat-2023-10-08-page1.json")["features"]
                   if f["collection"] == "landsat-c2-l2")
    landsat = {**landsat, "geometry": s2[0].geometry, "bbox": s2[0].bbox,
               "properties": {**landsat["properties"], "datetime": pystac.utils.datetime_to_str(s2[0].datetime)}}
    # Earth Search lists every processing of a scene: the first late-2022 scene again as an older
    # processing "..._0_L2A", made before the offset was removed from its DN (the raw files) while
    # its earthsearch:boa_offset_applied says True (element84/earth-search #66, #71).
    late = next(scene for scene in s2 if scene.properties["s2:processing_baseline"] >= "04.00")
    older = earth_search_s2_item(late, es_root, lambda band, scene=late: origin.url + _raw_path(origin, scene, band))
    older["id"] = f"S2{late.properties['platform'][-1]}_{late.properties['s2:mgrs_tile']}_{late.datetime:%Y%m%d}_0_L2A"
    for key in ("created", "updated"):
        older["properties"][key] = "2022-01-01T00:00:00.000Z"
    origin.earth_search = StacApi(es_root, EARTH_SEARCH_ROOT, "earthsearch-landing-page-2025-07-31.json", "earthsearch",
                                  es_items + [older, landsat])

    opera_paths = {}
    passes = Counter()
    for scene in s1:
        relative_orbit = scene.properties["sat:relative_orbit"]
        passes[relative_orbit] += 1
        burst = f"T{relative_orbit:03d}_{279900 + passes[relative_orbit]:06d}_IW2"
        layers = {"_VV.tif": Path(scene.assets["vv"].get_absolute_href()),
                  "_VH.tif": Path(scene.assets["vh"].get_absolute_href()),
                  "_mask.tif": _opera_mask(scene, folder / "opera")}
        if asf is not None:  # ASF's chain: datapool -> gateway -> S3
            name = granule_name(scene, burst)
            urls = {suffix: asf.add(name, f"{name}{suffix}", file) for suffix, file in layers.items()}
            opera_paths[scene.id] = {suffix: f"OPERA_L2_RTC-S1/{name}/{name}{suffix}" for suffix in layers}
            cmr.granules.append(opera_granule(scene, urls, burst))
            continue
        paths = {suffix: f"/RTC/OPERA-S1/{scene.id}{suffix}" for suffix in layers}
        for suffix, file in layers.items():
            origin.files[paths[suffix]] = Served(file, bearer=earthdata_token)
        opera_paths[scene.id] = paths
        cmr.granules.append(opera_granule(scene, {suffix: origin.url + path for suffix, path in paths.items()}, burst))
    return Published(scenes, mpc_root, es_root, cmr.host, earthdata_token, opera_paths)
