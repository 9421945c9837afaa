"""The download stage: checkpoints given by name (``v2-small``) or as ``hf://owner/repo/path``,
fetched once from Hugging Face into a cache.

Two halves, so that reading the Snakefile stays cheap and offline:

* ``hub_file`` and ``cached_path`` (parse time: the Snakefile, ``tessera plan``): what a
  ``model.checkpoint`` value refers to and the fixed path its file has in the cache. No network,
  no huggingface_hub import; the path does not depend on what the Hub answers, so Snakemake can
  name it as the input of every rule that reads the checkpoint before it exists.
* ``download`` (rule ``download``, ``tessera download``): fetches the file with huggingface_hub
  (its progress bar, resumable partial files, ``HF_ENDPOINT``, ``HF_TOKEN``), checks its size and
  SHA-256 where known, and moves it onto that path.

The cache is ``model.cache_dir``, else ``$HF_HOME/tessera``, else huggingface_hub's own default
home (``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``) + ``/tessera``; a file lives at
``<cache>/<owner>/<repo>/<revision>/<path in repo>``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import UserError
from tessera.io import atomic_path, sha256_file
from tessera.models import HUB, NOT_BY_NAME, PUBLISHED, PublishedCheckpoint, published_checkpoint

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
DEFAULT_REVISION = "main"
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face model repository, as ``model.checkpoint`` names it."""

    reference: str  # what the config says: a published name or an hf:// reference
    repo_id: str
    filename: str
    revision: str = DEFAULT_REVISION
    size: int | None = None
    sha256: str | None = None
    family: str | None = None  # the family of a published name


def hub_file(checkpoint: str) -> HubFile | None:
    """What ``model.checkpoint`` names on the Hub; None for an existing file or ``demo``.

    UserError for a v1.x name (those are not fetched: the message says where to get them), an
    unknown name and a malformed ``hf://`` reference.
    """
    if checkpoint == "demo" or Path(checkpoint).is_file():
        return None
    published = published_checkpoint(checkpoint)
    if published is not None:
        return published_file(published)
    if checkpoint.startswith(HF_PREFIX):
        return _parse_hf_reference(checkpoint)
    for family in sorted(NOT_BY_NAME, key=len, reverse=True):
        if checkpoint == family or checkpoint.startswith(f"{family}-"):
            raise UserError(f"model.checkpoint {checkpoint!r}: {family} checkpoints are not downloaded by name; get "
                            f"{NOT_BY_NAME[family]} and give its path")
    names = ", ".join(entry.name for entry in PUBLISHED)
    raise UserError(f"model.checkpoint {checkpoint!r} is not a file, a published name ({names}) or an "
                    "hf://owner/repo/path reference: give the path of a downloaded checkpoint, one of those, or demo")


def published_file(published: PublishedCheckpoint) -> HubFile:
    """The Hub file of a published checkpoint (``models.PUBLISHED``)."""
    return HubFile(published.name, published.repo_id, published.filename, DEFAULT_REVISION, published.size,
                   published.sha256, published.family)


def _parse_hf_reference(checkpoint: str) -> HubFile:
    parts = checkpoint[len(HF_PREFIX):].split("/")
    owner, repo, revision = (parts + ["", ""])[:2] + [DEFAULT_REVISION]
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    filename = "/".join(parts[2:])
    if (len(parts) < 3 or not _REPO_PART.match(owner) or not _REPO_PART.match(repo) or not revision
            or not filename or any(p in ("", ".", "..") for p in parts[2:])):
        raise UserError(f"model.checkpoint {checkpoint!r} is not a Hugging Face reference: write "
                        "hf://owner/repo/path/in/repo.pt (or hf://owner/repo@revision/path)")
    return HubFile(checkpoint, f"{owner}/{repo}", filename, revision)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where downloaded checkpoints live (``model.cache_dir``, else under ``HF_HOME``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "tessera"


def cached_path(file: HubFile, cache_dir: str | os.PathLike | None = None) -> Path:
    """The file's fixed path in the cache, whether it is there yet or not."""
    return cache_root(cache_dir) / file.repo_id / file.revision / file.filename


def checkpoint_path(checkpoint: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The path rules read ``model.checkpoint`` from: a file as given, or a Hub file's cache path."""
    file = hub_file(checkpoint)
    return checkpoint if file is None else str(cached_path(file, cache_dir))


def checkpoint_bytes(checkpoint: str, cache_dir: str | os.PathLike | None = None) -> int:
    """The size of the checkpoint ``model.checkpoint`` names, for the memory its jobs ask for: the
    file's, else the Hub file's recorded size; 0 where not known yet (``demo``, whose checkpoints are
    small, and an ``hf://`` file without a recorded size, for which retries ask for more)."""
    if checkpoint == "demo":
        return 0
    file = hub_file(checkpoint)
    if file is None:
        return Path(checkpoint).stat().st_size
    cached = cached_path(file, cache_dir)
    return cached.stat().st_size if cached.is_file() else (file.size or 0)


def needs_download(checkpoint: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``model.checkpoint`` names a Hub file that is not in the cache yet."""
    file = hub_file(checkpoint)
    return file is not None and not cached_path(file, cache_dir).is_file()


def download(checkpoint: str, cache_dir: str | os.PathLike | None = None, *, sha256: str | None = None) -> Path:
    """Fetch the checkpoint ``model.checkpoint`` names into the cache once; its cached path.

    ``sha256`` replaces the recorded digest (and drops the recorded size): for a file you pin yourself.
    """
    file = hub_file(checkpoint)
    if file is None:
        raise UserError(f"model.checkpoint {checkpoint!r} is a local file or demo: there is nothing to download")
    target = cached_path(file, cache_dir)
    if target.is_file():
        log.info("%s is in the cache: %s", checkpoint, target)
        return target
    expected_sha256, expected_size = (sha256.lower(), None) if sha256 else (file.sha256, file.size)
    staging = target.parent / f".{target.name}.download"
    fetched = Path(_hf_download(file, staging))
    _check(fetched, file, expected_size, expected_sha256)
    with atomic_path(target) as tmp:
        os.replace(fetched, tmp)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("downloaded %s to %s", checkpoint, target)
    return target


def _hf_download(file: HubFile, staging: Path) -> str:
    """huggingface_hub's download into ``staging`` (a partial file there resumes), errors as one line."""
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT", HUB).rstrip("/")
    where = f"{file.repo_id}@{file.revision}/{file.filename} on {endpoint}"
    try:
        return hf_hub_download(file.repo_id, file.filename, revision=file.revision, local_dir=staging,
                               endpoint=endpoint, tqdm_class=_progress_bar())
    except GatedRepoError:
        raise UserError(f"{file.reference}: {where} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{file.reference}: repository {file.repo_id} is not on {endpoint} (or is private: set "
                        "HF_TOKEN): check the name") from None
    except RevisionNotFoundError:
        raise UserError(f"{file.reference}: revision {file.revision!r} of {file.repo_id} does not exist: check "
                        "the reference") from None
    except RemoteEntryNotFoundError:
        raise UserError(f"{file.reference}: {file.repo_id} has no file {file.filename!r} at {file.revision}: "
                        "check the path") from None
    except LocalEntryNotFoundError:  # no answer from the Hub (offline, refused) and nothing cached
        raise UserError(f"{file.reference}: {where} cannot be reached and is not in the cache: check the network "
                        "(and HF_HUB_OFFLINE), or download it elsewhere and give its path") from None
    except (HfHubHTTPError, httpx2.HTTPError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{file.reference}: downloading {where} failed ({first}): rerun to resume") from None


def _progress_bar():
    """A tqdm bar that also shows in a job's log file (huggingface_hub's own hides itself when stderr
    is not a terminal), updated every 15 s there; HF_HUB_DISABLE_PROGRESS_BARS turns it off."""
    import sys

    from tqdm import tqdm

    quiet = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on")
    interval = 0.1 if sys.stderr.isatty() else 15.0

    class ProgressBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("mininterval", interval)
            super().__init__(*args, disable=quiet, **kwargs)

    return ProgressBar


def _check(path: Path, file: HubFile, size: int | None, sha256: str | None) -> None:
    """Refuse (and remove) a download whose size or SHA-256 differs from the recorded one."""
    problem = None
    if size is not None and path.stat().st_size != size:
        problem = f"{path.stat().st_size} bytes, not the recorded {size}"
    elif sha256 is not None and (digest := sha256_file(path)) != sha256:
        problem = f"SHA-256 {digest}, not the recorded {sha256}"
    if problem:
        path.unlink(missing_ok=True)
        raise UserError(f"{file.reference}: the downloaded {file.repo_id}/{file.filename} has {problem}: the "
                        "published file changed or the download is damaged; set model.sha256 to accept another file")
