"""A real STAC API on 127.0.0.1 over a static catalog: stac-fastapi-static under uvicorn.

With a ``file://`` catalog, stac-fastapi-static also mounts the catalog folder as static files at
``/`` (HTTP range requests work), and rewrites every item's local asset path to
``<API root>/<path relative to catalog.json>``. A client therefore gets plain
``http://127.0.0.1:PORT/sentinel-2-l2a/<item>/B04.tif`` hrefs that GDAL reads with range requests,
exactly like Planetary Computer hrefs (``planetary_computer.sign`` leaves them unchanged). This
needs relative asset hrefs in the catalog, which ``generate_catalog`` writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tessera.errors import UserError

STARTUP_TIMEOUT_SECONDS = 60.0
_STOP_GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1
# Resolved now, not in the forked child, where a lock held by another thread could block dlopen.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM when the parent dies.

    That covers what no ``finally`` can: the parent killed by SIGKILL, or by a SIGTERM it does not
    handle (Snakemake stopping a job). Linux ties this to the thread that started the server.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def serve_catalog(catalog_json: Path) -> Iterator[str]:
    """Serve ``catalog_json`` as a STAC API on a free 127.0.0.1 port; yield its root URL.

    The server (and its process group) is stopped when the block exits, however it exits, and on
    Linux also when this process is killed. Call it from a thread that outlives the block.
    """
    catalog_json = Path(catalog_json).resolve()
    if not catalog_json.is_file():
        raise UserError(f"demo catalog {catalog_json} does not exist: generate it first (tessera.demo.generate_catalog)")
    if importlib.util.find_spec("stac_fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UserError("source demo needs the demo extra (a local STAC API): pip install 'tessera-workflow[demo]', "
                        "or use a real source (mpc, aws, stac)")
    # Bind the port here and hand the socket to uvicorn (--fd): no window in which another
    # process could take a port we picked.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # uvicorn wraps a socket given by --fd as AF_UNIX, so asyncio never sets TCP_NODELAY on the
    # connections it accepts: Nagle's algorithm then holds back each response's last segment
    # until the client's delayed ACK, about 40 ms per HTTP range request. Linux copies the option
    # from the listening socket to every accepted one.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    env = {
        **os.environ,
        "CATALOG_HREF": catalog_json.as_uri(),
        "LOG_LEVEL": "warning",
        # stac-fastapi reads its deployment mode from ENVIRONMENT, which SLURM sets to "BATCH"
        # in batch jobs; the server refuses to start with that value.
        "ENVIRONMENT": "production",
    }
    command = [
        sys.executable, "-m", "uvicorn", "stac_fastapi.static.app:app",
        "--fd", str(listener.fileno()), "--log-level", "warning", "--no-access-log",
    ]
    with tempfile.TemporaryFile() as log, contextlib.closing(listener):
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(listener.fileno(),),
            start_new_session=True,  # its own process group, stopped as a whole
            preexec_fn=_die_with_parent if _prctl is not None else None,
        )
        try:
            listener.close()
            _wait_until_ready(process, url, log)
            yield url
        finally:
            _stop(process)


def _wait_until_ready(process: subprocess.Popen, url: str, log) -> None:
    # Talk to the server directly even if the environment names an HTTP proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"demo STAC server exited with code {process.returncode} before answering: {_tail(log)}")
        try:
            with opener.open(url, timeout=2):
                return
        except urllib.error.HTTPError as error:
            # It is up but cannot serve the catalog: waiting will not help.
            detail = error.read().decode(errors="replace")[:500]
            raise RuntimeError(f"demo STAC server at {url} answered HTTP {error.code} for its landing page: {detail} {_tail(log)}") from None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(_POLL_SECONDS)
    raise RuntimeError(f"demo STAC server did not answer at {url} within {STARTUP_TIMEOUT_SECONDS:.0f} s: {_tail(log)}")


def _tail(log, limit: int = 2000) -> str:
    log.seek(0)
    text = log.read().decode(errors="replace").strip()
    return text[-limit:] or "(no output)"


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if the server outlives a grace time, reap it.

    Signals go to the group only while the server is not yet reaped, so its id cannot have been
    reused by an unrelated process.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
