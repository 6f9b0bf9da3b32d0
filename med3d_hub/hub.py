"""Every byte that crosses the network, and the caches those bytes land in.

- Hub files go through ``huggingface_hub`` (its cache, ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE``,
  ``local_files_only``, tokens, revisions and file locks). Mirrors outside the Hub (plain URLs in a
  manifest) go through ``requests``: streamed, with timeouts, to a temporary file renamed into place.
- Every file is checked against its sha256 before anything reads it. A mismatch removes the bad bytes
  from the Hugging Face cache (blob and snapshot links) and from ours, then raises ``ChecksumError``.
- Converted weights are kept as ``<sha256>.safetensors`` in our cache, ``$MED3D_HUB_CACHE`` or
  ``$HF_HOME/med3d_hub``, written atomically; later loads read them by memory map.
- The environment is read at each call and handed to ``huggingface_hub`` as explicit arguments
  (``endpoint=``, ``cache_dir=``, ``local_files_only=``, ``token=``), because the client itself reads
  it only once, at import.

Reaching a Hub is bounded: before ``hf_hub_download`` (whose own retries can take minutes on a dead
or silent server) one metadata request is made with a single timeout (``HF_HUB_ETAG_TIMEOUT``,
default 10 s) and no retries. If it fails, the cached copy is used when there is one; otherwise the
error says what was tried and the ways out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import torch

log = logging.getLogger(__name__)

__all__ = [
    "ChecksumError",
    "Fetched",
    "HubFile",
    "HubUnreachableError",
    "Settings",
    "WeightsDownloadError",
    "cached_weights_path",
    "fetch",
    "load_cached_weights",
    "parse_hf_reference",
    "settings",
    "sha256_file",
    "store_weights",
    "weights_lock",
]

DEFAULT_TIMEOUT = 10.0  # seconds for one metadata request or one read of a download
CACHE_ENV = "MED3D_HUB_CACHE"
_CHUNK = 8 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}


class HubUnreachableError(ConnectionError):
    """No server could be reached (or offline mode is on) and no verified cached copy exists."""


class ChecksumError(OSError):
    """A file's sha256 differs from the expected one; the bad bytes were removed from the caches."""


class WeightsDownloadError(OSError):
    """The server answered, but not with the file: missing repo, revision or file, no access, a broken transfer."""


# -- where things are ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub model repo at a revision (a branch, tag or commit sha)."""

    repo_id: str
    filename: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}/{self.filename}"


def parse_hf_reference(ref: str) -> HubFile:
    """``hf://org/repo[@revision]/path/in/repo`` -> HubFile. A revision containing '/' is written %2F-quoted."""
    body = ref[len("hf://") :] if ref.startswith("hf://") else ref
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(
            f"cannot read Hub reference {ref!r}: expected hf://org/repo@revision/path/to/file "
            "(the @revision part is optional, default main)"
        )
    repo_name, _, revision = parts[1].partition("@")
    if not repo_name or (parts[1].endswith("@")):
        raise ValueError(f"cannot read Hub reference {ref!r}: empty repo name or revision")
    return HubFile(f"{parts[0]}/{repo_name}", "/".join(parts[2:]), unquote(revision) or "main")


@dataclass(frozen=True)
class Settings:
    """Hub and cache settings, read from the environment at call time."""

    endpoint: str
    hub_cache: Path  # huggingface_hub's cache (HF_HUB_CACHE)
    cache: Path  # ours: converted weights, URL downloads, locks
    offline: bool
    token: str | bool | None
    timeout: float
    download_timeout: float


def _flag(*names: str) -> bool | None:
    values = [os.environ[n] for n in names if n in os.environ]
    return None if not values else any(v.strip().lower() in _TRUE for v in values)


def _seconds(name: str) -> float:
    raw = os.environ.get(name)
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number of seconds")
    return value


def settings(
    *, cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, token: str | bool | None = None
) -> Settings:
    """The settings of one load: explicit arguments first, then the environment, then huggingface_hub's defaults."""
    from huggingface_hub import constants

    offline = _flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    home = Path(os.path.expanduser(os.environ["HF_HOME"])) if os.environ.get("HF_HOME") else Path(constants.HF_HOME)
    hub_cache = (
        cache_dir
        or os.environ.get("HF_HUB_CACHE")
        or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or (home / "hub" if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE)
    )
    if token is None:
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    return Settings(
        endpoint=(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
        hub_cache=Path(os.path.expanduser(str(hub_cache))),
        cache=Path(os.path.expanduser(os.environ.get(CACHE_ENV) or str(home / "med3d_hub"))),
        offline=bool(local_files_only or (constants.HF_HUB_OFFLINE if offline is None else offline)),
        token=token,
        timeout=_seconds("HF_HUB_ETAG_TIMEOUT"),
        download_timeout=_seconds("HF_HUB_DOWNLOAD_TIMEOUT"),
    )


# -- hashing -----------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(what: str, expected: str, actual: str, removed: Sequence[Path], why: str) -> ChecksumError:
    gone = (
        "The bad copy was removed from the cache: " + ", ".join(str(p) for p in removed) + "."
        if removed
        else "Nothing was kept."
    )
    return ChecksumError(f"sha256 mismatch for {what}: expected {expected}, got {actual}. {gone} {why}")


# -- our cache of converted weights -----------------------------------------------------------------


def cached_weights_path(sha256: str, s: Settings) -> Path:
    """Where the safetensors copy of the weights file with this sha256 lives (whether or not it exists)."""
    return s.cache / "weights" / f"{sha256}.safetensors"


def load_cached_weights(sha256: str, s: Settings) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The cached state dict of a weights file (memory-mapped) and its metadata, or None.

    An unreadable cache file is removed, so the weights are fetched and converted again.
    """
    from safetensors import SafetensorError, safe_open

    path = cached_weights_path(sha256, s)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        log.warning("removing unreadable cached weights %s (%s); they will be rebuilt", path, error)
        path.unlink(missing_ok=True)
        return None


def store_weights(sha256: str, state_dict: Mapping[str, torch.Tensor], s: Settings, metadata: Mapping[str, str]) -> Path | None:
    """Write the state dict as ``<sha256>.safetensors``: temp file, then an atomic rename. None if the cache is read-only."""
    from safetensors.torch import save_file

    path = cached_weights_path(sha256, s)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=dict(metadata))
        os.replace(tmp, path)
    except OSError as error:
        log.warning("could not cache converted weights in %s (%s); the next load will convert again", path, error)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def weights_lock(key: str, s: Settings) -> Iterator[None]:
    """A cross-process lock on one set of weights, so concurrent loaders fetch and convert once.

    Best effort, like huggingface_hub's: on filesystems without working locks every process does the
    work itself, which is safe because each writes its own temporary file and renames it atomically.
    """
    from huggingface_hub.utils import WeakFileLock

    lock_path = s.cache / "locks" / f"{key}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only cache: nothing will be written, nothing to protect
        yield
        return
    with WeakFileLock(lock_path):
        yield


# -- fetching ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """A verified local file (``path``), or only its sha256 when ``skip_if`` said it is already converted."""

    path: Path | None
    sha256: str
    where: str  # the URL or cache path it came from


def fetch(
    sources: Sequence[HubFile | str],
    s: Settings,
    *,
    expected_sha256: str | None,
    label: str,
    skip_if: Callable[[str], bool] | None = None,
) -> Fetched:
    """Get one weights file from the first source that delivers it, verified against ``expected_sha256``.

    ``sources`` are Hub files and mirror URLs, tried in order. Without ``expected_sha256`` (a Hub file
    outside any manifest) the file is checked against the sha256 the Hub reports for it. ``skip_if(sha)``
    lets the caller stop before a download whose result it already holds. ``label`` names the
    weights in messages.
    """
    if not sources:
        raise ValueError(f"{label}: no source to download from")
    failures: list[tuple[str, OSError]] = []
    for source in sources:
        try:
            if isinstance(source, HubFile):
                return _fetch_hub(source, s, expected_sha256, skip_if)
            if expected_sha256 is None:
                raise ValueError(f"{label}: a URL source needs a sha256 to check the download against")
            return _fetch_url(source, s, expected_sha256)
        except (HubUnreachableError, ChecksumError, WeightsDownloadError) as error:
            failures.append((str(source), error))
            if len(sources) > 1:
                log.warning("could not get %s from %s: %s", label, source, error)
    errors = [e for _, e in failures]
    first = sources[0]
    example = os.path.basename(first.filename if isinstance(first, HubFile) else urlsplit(first).path)
    ways_out = f" {_ways_out(s, example)}" if any(isinstance(e, HubUnreachableError) for e in errors) else ""
    if len(failures) == 1:
        if not ways_out:
            raise errors[0]
        raise HubUnreachableError(f"{errors[0]}{ways_out}") from None
    tried = "\n".join(f"  - {where}: {error}" for where, error in failures)
    kind = (
        ChecksumError
        if any(isinstance(e, ChecksumError) for e in errors)
        else HubUnreachableError
        if all(isinstance(e, HubUnreachableError) for e in errors)
        else WeightsDownloadError
    )
    raise kind(f"could not get {label} from any of its {len(failures)} sources:\n{tried}\n{ways_out.strip()}".rstrip())


def _ways_out(s: Settings, filename: str) -> str:
    return (
        f"Ways out: point HF_ENDPOINT at a reachable Hub or mirror (now {s.endpoint}); "
        f"or load a local copy with create_model(name, pretrained='/path/to/{filename or 'weights.pth'}'); "
        "or use the offline cache: load once with network access, then set HF_HUB_OFFLINE=1 "
        f"(caches: {s.hub_cache} and {s.cache})."
    )


def _fetch_hub(f: HubFile, s: Settings, expected: str | None, skip_if: Callable[[str], bool] | None) -> Fetched:
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    url = hf_hub_url(f.repo_id, f.filename, revision=f.revision, endpoint=s.endpoint)
    if s.offline:
        path = _from_hf_cache(f, s)
        if path is None:
            raise HubUnreachableError(
                f"{f} is not in the Hugging Face cache {s.hub_cache}, and offline mode is on "
                "(HF_HUB_OFFLINE or local_files_only), so it was not downloaded from "
                f"{url}."
            )
        return _verify_hf(path, f, s, expected, where=str(path))

    # One bounded request tells whether the server is there, and what it holds.
    try:
        meta = get_hf_file_metadata(url, token=s.token, timeout=s.timeout, endpoint=s.endpoint)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status is None or status >= 500:
            return _unreachable(f, s, url, _reason(error), expected)
        raise _not_served(f, url, error) from None
    except (httpx2.TransportError, OfflineModeIsEnabled, OSError) as error:
        return _unreachable(f, s, url, _reason(error), expected)
    if meta.commit_hash is None:
        reason = "an answer without the X-Repo-Commit header: this server does not speak the Hub protocol"
        return _unreachable(f, s, url, reason, expected)

    remote = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
    if expected and remote and remote != expected:
        raise _mismatch(
            f"{f.filename} at {url}",
            expected,
            remote,
            (),
            "The server reports other content than the manifest pins (changed upstream, or a wrong mirror); "
            "nothing was downloaded.",
        )
    want = expected or remote
    if want and skip_if is not None and skip_if(want):
        return Fetched(None, want, url)
    path = _hf_download(f, s, url)
    return _verify_hf(path, f, s, want, where=url)


def _hf_download(f: HubFile, s: Settings, url: str) -> str:
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(
            f.repo_id,
            f.filename,
            revision=f.revision,
            cache_dir=s.hub_cache,
            endpoint=s.endpoint,
            token=s.token,
            etag_timeout=s.timeout,
        )
    except LocalEntryNotFoundError as error:
        raise HubUnreachableError(f"lost the connection to {s.endpoint} while downloading {url}: {error}.") from None
    except HfHubHTTPError as error:
        raise _not_served(f, url, error) from None
    except (httpx2.TransportError, OSError) as error:
        raise WeightsDownloadError(f"the download of {url} failed: {error}; nothing was kept, retry") from None


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().rstrip(":")


def _unreachable(f: HubFile, s: Settings, url: str, reason: str, expected: str | None) -> Fetched:
    """The server is not there: use the cached copy if there is one, else explain."""
    path = _from_hf_cache(f, s)
    if path is not None:
        log.warning("could not reach %s (%s); using the cached copy of %s", s.endpoint, reason, f)
        return _verify_hf(path, f, s, expected, where=str(path))
    raise HubUnreachableError(
        f"could not reach the Hub at {s.endpoint} for {f}: tried HEAD {url} (timeout {s.timeout:g} s, "
        f"no retries) and got {reason}; the file is not in the cache {s.hub_cache}."
    ) from None


def _not_served(f: HubFile, url: str, error: BaseException) -> WeightsDownloadError:
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        what = f"{f.repo_id} is gated: accept its conditions on the Hub and set HF_TOKEN"
    elif isinstance(error, RepositoryNotFoundError):
        what = f"repo {f.repo_id} was not found (or is private: set HF_TOKEN)"
    elif isinstance(error, RevisionNotFoundError):
        what = f"revision {f.revision!r} does not exist in {f.repo_id}"
    elif isinstance(error, EntryNotFoundError):
        what = f"{f.filename} does not exist in {f.repo_id}@{f.revision}"
    else:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = "; check HF_TOKEN" if status in (401, 403) else ""
        what = f"the server refused it (HTTP {status}){hint}"
    return WeightsDownloadError(f"cannot download {url}: {what}")


def _from_hf_cache(f: HubFile, s: Settings) -> str | None:
    """The cached copy of a Hub file at its revision, without any network call; None if there is none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(f.repo_id, f.filename, revision=f.revision, cache_dir=s.hub_cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError):
        return None


def _verify_hf(path: str, f: HubFile, s: Settings, expected: str | None, *, where: str) -> Fetched:
    """Check a file in the Hugging Face cache; remove it (blob and snapshot links) if it is wrong."""
    blob = Path(os.path.realpath(path))
    if expected is None and _SHA256.fullmatch(blob.name):
        expected = blob.name  # the cache names LFS blobs after the sha256 the Hub reported at download time
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        removed = _purge_hf_file(Path(path), s)
        raise _mismatch(
            f"{f.filename} ({f}, from {where})",
            expected,
            actual,
            removed,
            "The download was corrupted or the server holds other bytes than it reports; retry, or check the mirror.",
        )
    if expected is None:
        log.warning("the Hub reported no sha256 for %s; it is loaded without a content check", f)
    return Fetched(Path(path), actual, where)


def _purge_hf_file(pointer: Path, s: Settings) -> list[Path]:
    """Remove a bad file from the Hugging Face cache: its blob and every snapshot entry pointing to it."""
    blob = os.path.realpath(pointer)
    removed: list[Path] = []
    repo_dir = next((p.parent for p in pointer.parents if p.name == "snapshots"), None)
    if repo_dir is not None:
        for root, _dirs, files in os.walk(repo_dir / "snapshots"):
            for name in files:
                entry = Path(root) / name
                if entry.is_symlink() and os.path.realpath(entry) == blob:
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
    for leftover in (pointer, Path(blob)):
        if leftover.exists() or leftover.is_symlink():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _fetch_url(url: str, s: Settings, expected: str) -> Fetched:
    """A manifest mirror outside the Hub: streamed with requests, hashed on the fly, renamed into place once verified."""
    name = os.path.basename(urlsplit(url).path) or "weights"
    final = s.cache / "downloads" / expected / name
    if final.is_file():
        actual = sha256_file(final)
        if actual == expected:
            return Fetched(final, actual, str(final))
        final.unlink()
        raise _mismatch(f"{name} (cached from {url})", expected, actual, [final], "The cached copy was damaged; retry.")
    if s.offline:
        raise HubUnreachableError(f"{url} is not in the cache {final.parent}, and offline mode is on.")

    import requests

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{name}.{uuid.uuid4().hex[:8]}.incomplete")
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=(s.timeout, s.download_timeout)) as response:
            response.raise_for_status()
            with open(tmp, "wb") as out:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
        actual = digest.hexdigest()
        if actual != expected:
            raise _mismatch(f"{name} from {url}", expected, actual, (), "The mirror serves other bytes; check it.")
        os.replace(tmp, final)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise HubUnreachableError(f"could not reach {url} (timeout {s.timeout:g} s): {error}.") from None
    except requests.HTTPError as error:
        raise WeightsDownloadError(f"cannot download {url}: {error}") from None
    except requests.RequestException as error:
        raise WeightsDownloadError(f"the download of {url} failed: {error}; nothing was kept, retry") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Fetched(final, actual, url)
