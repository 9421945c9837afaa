"""Fault injection for tests: a misbehaving HTTP proxy and ways to damage files on disk.

``FaultyProxy`` is a forward HTTP proxy on 127.0.0.1. Pointed at with ``http_proxy`` (which both
GDAL's libcurl and requests/pystac-client honour, in this process and in subprocesses), it relays
every request of a fetch to the demo STAC API and its asset server and, for a chosen share of
them, answers with a 5xx, resets the connection, stalls past the client's timeout, or truncates the
body. Faults are deterministic: whether the n-th attempt at a request fails depends only on the
seed, the request (method, URL, Range, body) and n, never on thread timing; and a request fails at
most ``max_consecutive`` times in a row, so that a test of "retries recover" cannot be flaky.

The damage helpers flip or cut bytes of a COG, a stack chunk, a patch embedding or a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

FAULT_KINDS = ("5xx", "reset", "stall", "truncate")
# Hop-by-hop headers (RFC 9110 §7.6.1) are the proxy's own business, not the upstream's.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade"}


@dataclass
class FaultPlan:
    """Which requests fail and how.

    ``share``: probability that an attempt fails (decided per request and attempt, seeded);
    ``targets``: URL substrings of the requests that may fail (default: all);
    ``kinds``: the faults drawn from; ``max_consecutive``: an attempt after that many failures of the
    same request always passes; ``broken``: regular expressions of URLs whose requests always fail with
    ``broken_status`` (a permanently broken scene); ``stall_seconds``: how long a stalled request
    hangs before its connection is closed (longer than the client's timeout, bounded for the test).
    """

    share: float = 0.0
    targets: tuple[str, ...] = ()
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    max_consecutive: int = 2
    broken: tuple[str, ...] = ()
    broken_status: int = 404
    stall_seconds: float = 5.0
    # An outage: after this many requests to ``targets``, every such request answers 503 until
    # ``FaultyProxy.end_outage()`` (a service down for minutes, as far as the fetch can tell).
    outage_after: int | None = None

    def __post_init__(self):
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {FAULT_KINDS}")

    def fault(self, url: str, request_key: str, attempt: int) -> str | None:
        """The fault of the ``attempt``-th try (0-based) at a request, or None to relay it."""
        if attempt >= self.max_consecutive or (self.targets and not any(t in url for t in self.targets)):
            return None
        draw = hashlib.sha256(f"{self.seed}|{request_key}|{attempt}".encode()).digest()
        if struct.unpack("<Q", draw[:8])[0] / 2**64 >= self.share:
            return None
        return self.kinds[draw[8] % len(self.kinds)]


@dataclass
class ProxyLog:
    """What went through the proxy: every request (URL and headers) and the faults injected."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    broken_hits: int = 0


class FaultyProxy:
    """A forward HTTP proxy on 127.0.0.1 that injects the faults of a ``FaultPlan``.

    ``rewrite(url, body) -> body`` may change JSON response bodies (e.g. sign asset hrefs).
    Use as a context manager; ``url`` is the proxy's address for ``http_proxy``.
    """

    def __init__(self, plan: FaultPlan | None = None, *, rewrite: Callable[[str, bytes], bytes] | None = None):
        self.plan = plan or FaultPlan()
        self.rewrite = rewrite
        self.log = ProxyLog()
        self._attempts: Counter = Counter()
        self._target_requests = 0
        self._outage_over = False
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def end_outage(self) -> None:
        self._outage_over = True

    def _in_outage(self, url: str) -> bool:
        plan = self.plan
        if plan.outage_after is None or self._outage_over or (plan.targets and not any(t in url for t in plan.targets)):
            return False
        with self._lock:
            self._target_requests += 1
            return self._target_requests > plan.outage_after

    def _next_attempt(self, key: str) -> int:
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
            return attempt

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                self._relay()

            def do_HEAD(self):
                self._relay()

            def do_POST(self):
                self._relay()

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                with proxy._lock:
                    proxy.log.requests.append((self.command, self.path, headers))
                if any(re.search(pattern, self.path) for pattern in proxy.plan.broken):
                    with proxy._lock:
                        proxy.log.broken_hits += 1
                    return self._answer(proxy.plan.broken_status, b"broken on purpose", {})
                if proxy._in_outage(self.path):
                    with proxy._lock:
                        proxy.log.faults["outage"] += 1
                    return self._answer(503, b"service unavailable", {})
                # Not the host: the demo API listens on a new port every run.
                target = urlsplit(self.path)
                key = f"{self.command} {target.path}?{target.query} {self.headers.get('Range', '')} {hashlib.sha256(body).hexdigest()}"
                fault = proxy.plan.fault(self.path, key, proxy._next_attempt(key))
                if fault:
                    with proxy._lock:
                        proxy.log.faults[fault] += 1
                if fault == "5xx":
                    return self._answer(503, b"injected fault", {"Retry-After": "0"})
                if fault == "reset":
                    return self._reset()
                if fault == "stall":
                    time.sleep(proxy.plan.stall_seconds)
                    self.close_connection = True
                    return None
                status, reason, upstream_headers, content, length = self._fetch_upstream(body, headers)
                if self.rewrite_applies(upstream_headers):
                    content = proxy.rewrite(self.path, content)
                    length = len(content)
                if fault == "truncate":
                    # The promised length, then half of it and a closed connection.
                    self._start(status, reason, upstream_headers, length)
                    self.wfile.write(content[: len(content) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                self._start(status, reason, upstream_headers, length)
                if self.command != "HEAD":
                    self.wfile.write(content)

            def rewrite_applies(self, upstream_headers) -> bool:
                return proxy.rewrite is not None and "json" in dict(upstream_headers).get("content-type", "")

            def _fetch_upstream(self, body: bytes, headers: dict[str, str]):
                target = urlsplit(self.path)
                if target.scheme != "http" or not target.hostname:
                    raise ValueError(f"not a forward-proxy request: {self.path}")
                # Plain bodies, so that rewrites see JSON and truncation cuts real bytes.
                headers = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
                connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
                try:
                    path = target.path + (f"?{target.query}" if target.query else "")
                    connection.request(self.command, path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    content = response.read()
                    # A HEAD answer carries the length of the body it did not send.
                    length = int(response.getheader("Content-Length") or len(content))
                    kept = [(k.lower(), v) for k, v in response.getheaders()
                            if k.lower() not in _HOP_BY_HOP | {"content-length", "date", "server"}]
                    return response.status, response.reason, kept, content, length
                finally:
                    connection.close()

            def _start(self, status: int, reason: str, headers, length: int) -> None:
                self.send_response(status, reason)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _answer(self, status: int, content: bytes, headers: dict[str, str]) -> None:
                self._start(status, None, list(headers.items()), len(content))
                self.wfile.write(content)

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

        return Handler


@contextlib.contextmanager
def proxied(proxy_url: str) -> Iterator[None]:
    """Route this process's (and its children's) HTTP through ``proxy_url``; restore on exit."""
    names = ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(http_proxy=proxy_url, HTTP_PROXY=proxy_url)
    os.environ.pop("no_proxy", None)
    os.environ.pop("NO_PROXY", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def proxy_environment(proxy_url: str) -> dict[str, str]:
    """The environment of a subprocess whose HTTP goes through ``proxy_url``."""
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    return {**env, "http_proxy": proxy_url, "HTTP_PROXY": proxy_url}


# --- damaged files --------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte (default: the middle one), as a bad disk sector or a bit rot would."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a share of its length, as an interrupted copy or download would."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def corrupt_cog(path: Path) -> None:
    """Damage the pixel data of a GeoTIFF while keeping its header readable: the file opens, its
    tiles do not decode."""
    import rasterio

    with rasterio.open(path) as src:
        offsets = [int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))]
    flip_byte(path, offsets[0] + 8)


def stack_chunks(store: Path, array: str) -> list[Path]:
    """The chunk files of one array of a Zarr v3 store (metadata excluded), sorted."""
    return sorted(p for p in (Path(store) / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def corrupt_stack_chunk(store: Path, array: str = "bands") -> Path:
    """Flip a byte in the middle of the first chunk of ``array``; returns the chunk."""
    chunk = stack_chunks(store, array)[0]
    flip_byte(chunk)
    return chunk


def corrupt_checkpoint_tensor(path: Path) -> None:
    """Flip a byte inside a tensor's data in a torch zip checkpoint (the archive stays readable)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else -1)
    # Local file header: 30 bytes + name + extra; the data follow, stored uncompressed by torch.
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    flip_byte(path, info.header_offset + 30 + name_length + extra_length + info.file_size // 2)


def sign_asset_hrefs(query: str) -> Callable[[str, bytes], bytes]:
    """A ``FaultyProxy`` rewrite that appends ``query`` to every asset href of STAC JSON, as an API
    that hands out pre-signed (SAS) URLs does."""

    def rewrite(url: str, body: bytes) -> bytes:
        try:
            document = json.loads(body)
        except ValueError:
            return body
        for feature in document.get("features", [document]) if isinstance(document, dict) else []:
            for asset in (feature.get("assets") or {}).values() if isinstance(feature, dict) else []:
                if isinstance(asset, dict) and "href" in asset and "?" not in asset["href"]:
                    asset["href"] += f"?{query}"
        return json.dumps(document).encode()

    return rewrite
