"""A loopback stand-in for the Hugging Face Hub's file endpoint and its LFS CDN.

What it reproduces is what huggingface_hub (2.x) asks of the Hub and reads from its answers, in
``huggingface_hub/file_download.py`` (``hf_hub_download`` -> ``_get_metadata_or_catch_error`` ->
``get_hf_file_metadata``, then ``http_get``) and ``huggingface_hub/utils/_http.py``
(``_httpx2_follow_hub_redirects_with_backoff``, ``hf_raise_for_status``):

* ``HEAD`` and ``GET /{owner}/{repo}/resolve/{revision}/{path}``; ``revision`` is a branch name or
  the 40-hex commit, answered with ``X-Repo-Commit`` (the client refuses an answer without it).
* An LFS file (every ``.pt`` here, as ``.gitattributes`` makes them on the Hub) is a ``302`` to a
  signed URL on another origin (the CDN) carrying ``X-Linked-Etag`` (the file's SHA-256, quoted),
  ``X-Linked-Size`` and ``ETag`` (the pointer's git oid): the client reads the metadata from the
  redirect itself and does not follow it on ``HEAD``; it ``GET``s the CDN URL, with ``Range`` when
  it resumes a partial file; the CDN answers with ``Content-Disposition`` naming the file.
* A plain git file is a ``200`` with ``ETag`` (git blob oid) and ``Content-Length``.
* Errors as the Hub sends them, by ``X-Error-Code``: an unknown repository is ``401``
  ``RepoNotFound`` (the Hub does not tell anonymous clients whether a private repo exists), an
  unknown revision ``404`` ``RevisionNotFound``, an unknown file ``404`` ``EntryNotFound`` (with
  ``X-Repo-Commit``).
* The CDN honours ``Range: bytes=N-`` with ``206`` and ``Content-Range`` (how the client resumes);
  ``cut_after`` drops its first answer's connection after that many bytes.
* No Xet headers (``X-Xet-Hash``): the client then takes the plain HTTP path above.

Not reproduced: ``GET /api/agent-harnesses`` (``huggingface_hub/utils/_detect_agent.py`` fetches a
registry once a day for its user agent) is answered 404, which the client treats as "no registry".
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Server:
    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class HubStandIn:
    """``files``: {repo_id: {path: bytes}}; ``.url`` goes into ``HF_ENDPOINT``."""

    def __init__(self, files: dict[str, dict[str, bytes]], branch: str = "main", cut_after: int | None = None):
        self.files = files
        self.cut_after = cut_after  # the CDN's first answer stops after this many bytes (a dropped connection)
        self.ranges: list[str] = []  # Range headers the CDN was sent
        self.branch = branch
        self.commits = {repo: secrets.token_hex(20) for repo in files}
        self.requests: Counter = Counter()  # (method, host, path) -> count
        self._tokens: dict[str, tuple[str, str]] = {}
        self.cdn = _Server(self._cdn_handler())
        self.hub = _Server(self._hub_handler())
        self.url = self.hub.url

    def close(self):
        self.hub.close()
        self.cdn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the Hub's /resolve endpoint ---
    def _resolve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        parts = unquote(urlparse(handler.path).path).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "EntryNotFound", "Not a resolve URL")
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.files:
            return self._error(handler, 401, "RepoNotFound", "Repository not found")
        commit = self.commits[repo]
        if revision not in (self.branch, commit):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id", commit=None)
        data = self.files[repo].get(filename)
        if data is None:
            return self._error(handler, 404, "EntryNotFound", "Entry not found", commit=commit)
        if filename.endswith(".pt"):
            token = secrets.token_urlsafe(12)
            self._tokens[token] = (repo, filename)
            handler.send_response(302)
            handler.send_header("Location", f"{self.cdn.url}/repos/{token}/{filename.rsplit('/', 1)[-1]}?X-Amz-Signature=x")
            handler.send_header("X-Repo-Commit", commit)
            handler.send_header("ETag", f'"{_git_blob_oid(b"version https://git-lfs.github.com/spec/v1")}"')
            handler.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            handler.send_header("X-Linked-Size", str(len(data)))
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{_git_blob_oid(data)}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
        return None

    @staticmethod
    def _error(handler, status: int, code: str, message: str, commit: str | None = None) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        if commit:
            handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    # --- the CDN: signed URLs only, Range requests ---
    def _serve_cdn(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        parts = urlparse(handler.path).path.split("/")
        found = self._tokens.get(parts[2]) if len(parts) > 3 and parts[1] == "repos" else None
        if found is None:
            handler.send_response(403)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = self.files[found[0]][found[1]]
        start = 0
        ranged = handler.headers.get("Range", "")
        if ranged:
            self.ranges.append(ranged)
        if ranged.startswith("bytes=") and ranged[6:].split("-")[0].isdigit():
            start = int(ranged[6:].split("-")[0])
        handler.send_response(206 if start else 200)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        # The signed URL asks the store for this header; huggingface_hub names its progress bar after it.
        name = found[1].rsplit("/", 1)[-1]
        handler.send_header("Content-Disposition", f"inline; filename*=UTF-8''{name}; filename=\"{name}\";")
        handler.end_headers()
        if body and self.cut_after is not None:
            handler.wfile.write(data[start:start + self.cut_after])
            handler.close_connection = True
            self.cut_after = None
        elif body:
            handler.wfile.write(data[start:])

    def _hub_handler(self):
        return self._handler("hub", self._resolve)

    def _cdn_handler(self):
        return self._handler("cdn", self._serve_cdn)

    def _handler(self, host: str, serve):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                stand_in.requests[("HEAD", host, urlparse(self.path).path)] += 1
                serve(self, body=False)

            def do_GET(self):
                stand_in.requests[("GET", host, urlparse(self.path).path)] += 1
                serve(self, body=True)

            def log_message(self, *args):
                pass

        return Handler
