"""Every byte that crosses the network, and the caches those bytes land in.

- Hub files go through ``huggingface_hub`` (its cache, ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE``,
  ``local_files_only``, tokens, revisions and file locks). Mirrors outside the Hub (plain URLs in a
  manifest) go through ``requests``: streamed, with timeouts, to a temporary file renamed into place.
- Every file is checked against its sha256 before anything reads it. A mismatch removes the bad bytes
  from the Hugging Face cache (blob and snapshot links) and from ours, then raises ``ChecksumError``.
- One cache root holds everything the package keeps: ``$MED3D_HUB_CACHE``, else ``$HF_HOME/med3d_hub``
  (``cache_root``). Converted weights are ``weights/<sha256>.safetensors`` there, written atomically,
  read by memory map, and each names its source in its metadata (checked at every load, see
  ``load_cached_weights``); mirror downloads go to ``downloads/``, training data to ``train/``.
- Repo ids, revisions and filenames are checked against the Hub's rules before any of them reaches
  the client (``check_hub_file``): they become paths in the caches.
- Tokens never reach a message: ``redact`` removes them from everything the package prints or logs.
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
import inspect
import logging
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence
from urllib.parse import quote, unquote, urljoin, urlsplit

import torch

from ..errors import EXIT_UNREACHABLE, Med3DError, UsageError
from ..files import atomic_write, sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "ChecksumError",
    "Fetched",
    "HubFile",
    "HubUnreachableError",
    "Settings",
    "WeightsDownloadError",
    "CACHE_KINDS",
    "CacheUse",
    "cache_kinds",
    "cache_root",
    "cache_usage",
    "cached_weights_path",
    "check_hub_file",
    "clean_stale_temporaries",
    "clear_cache",
    "hub_repo_folder",
    "fetch",
    "redact",
    "load_cached_weights",
    "parse_hf_reference",
    "settings",
    "is_sha256",
    "sample_digest",
    "sha256_file",
    "store_weights",
    "verify_cache",
    "weights_lock",
]

DEFAULT_TIMEOUT = 10.0  # seconds for one metadata request or one read of a download
DEFAULT_DEADLINE = 1800.0  # seconds for one whole download, resumptions included
DEFAULT_RETRIES = 3  # resumptions of a download after the connection was cut
CACHE_ENV = "MED3D_HUB_CACHE"
OLD_CACHE_ENV = "MED3D_CACHE"  # deprecated: it used to hold only the training cache, under its train/ folder
CACHE_KINDS = ("weights", "downloads", "train")  # the folders of the cache root that `med3d cache` manages
CACHE_FORMAT = "med3d_hub.state_dict.v2"
STALE_AFTER_S = 6 * 3600.0  # a temporary file untouched this long belongs to a killed process
DEADLINE_ENV = "MED3D_HUB_DOWNLOAD_DEADLINE"
RETRIES_ENV = "MED3D_HUB_DOWNLOAD_RETRIES"
_READ = 1 << 20  # at most this many bytes per read of a download: memory stays flat
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}


class HubUnreachableError(Med3DError, ConnectionError):
    """No server could be reached (or offline mode is on) and no verified cached copy exists."""

    exit_code = EXIT_UNREACHABLE


class ChecksumError(Med3DError, OSError):
    """A file's sha256 differs from the expected one; the bad bytes were removed from the caches."""


class WeightsDownloadError(Med3DError, OSError):
    """The server answered, but not with the file: missing repo, revision or file, no access, a broken transfer."""


# -- secrets -------------------------------------------------------------------------------------------

_TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
_HUB_TOKEN = re.compile(r"(?<![A-Za-z0-9])(?:hf_|api_org_)[A-Za-z0-9]{8,}")  # user and organisation tokens
_AUTH_VALUE = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")  # an Authorization header's value


def redact(text: object, *secrets: str | None) -> str:
    """``text`` with anything token-shaped, the token environment variables' values and ``secrets`` replaced by ***.

    Every message, log line and traceback the package emits goes through here, since a server may
    echo the request's ``Authorization`` header in its error.
    """
    out = str(text)
    values = [os.environ.get(name) for name in _TOKEN_ENVS] + list(secrets)
    for value in sorted({v for v in values if isinstance(v, str) and len(v) >= 4}, key=len, reverse=True):
        out = out.replace(value, "***")
    out = _AUTH_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", out)
    return _HUB_TOKEN.sub("***", out)


# -- names that become paths ---------------------------------------------------------------------------

_REVISION_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\%]|\.\.|@\{|//")
_FILENAME_BAD = re.compile(r"[\x00-\x1f\x7f\\]")


def check_hub_file(repo_id: object, revision: object, filename: object, *, where: str = "") -> None:
    """Refuse a repo id, revision or filename the Hub would not accept, before it becomes a path in a cache.

    The repo id follows ``huggingface_hub.utils.validate_repo_id`` (and must be ``org/name``); a
    revision follows git's ref rules (no ``..``, no component starting with ``.``, no ``\\``, ``%``,
    spaces or ``~^:?*[``); a filename is a relative POSIX path without ``.``/``..`` components.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    prefix = f"{where}: " if where else ""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise UsageError(f"{prefix}repo id {repo_id!r} must be 'org/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{prefix}repo id {repo_id!r} is not a valid Hub repo id: {error}") from None
    if (
        not isinstance(revision, str)
        or not revision
        or len(revision) > 255
        or _REVISION_BAD.search(revision)
        or revision.endswith(("/", ".", ".lock"))
        or any(part.startswith(".") or not part for part in revision.split("/"))
        or revision == "@"
    ):
        raise UsageError(
            f"{prefix}revision {revision!r} is not a valid branch, tag or commit sha "
            "(git ref rules: no '..', no part starting with '.', no spaces, '\\', '%' or '~^:?*[')"
        )
    parts = filename.split("/") if isinstance(filename, str) else []
    if (
        not parts
        or len(filename) > 1024
        or _FILENAME_BAD.search(filename)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UsageError(
            f"{prefix}filename {filename!r} must be a relative path inside the repo (no '..', '.', empty parts, "
            "leading '/' or '\\'), e.g. 'resnet_50.pth'"
        )


# -- where things are ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub model repo at a revision (a branch, tag or commit sha)."""

    repo_id: str
    filename: str
    revision: str = "main"

    def __post_init__(self) -> None:
        check_hub_file(self.repo_id, self.revision, self.filename)

    def __str__(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}/{self.filename}"


def parse_hf_reference(ref: str) -> HubFile:
    """``hf://org/repo[@revision]/path/in/repo`` -> HubFile. A revision containing '/' is written %2F-quoted."""
    body = ref[len("hf://") :] if ref.startswith("hf://") else ref
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise UsageError(
            f"cannot read Hub reference {ref!r}: expected hf://org/repo@revision/path/to/file "
            "(the @revision part is optional, default main)"
        )
    repo_name, _, revision = parts[1].partition("@")
    if not repo_name or (parts[1].endswith("@")):
        raise UsageError(f"cannot read Hub reference {ref!r}: empty repo name or revision")
    try:
        return HubFile(f"{parts[0]}/{repo_name}", "/".join(parts[2:]), unquote(revision) or "main")
    except ValueError as error:
        raise UsageError(f"cannot use Hub reference {ref!r}: {error}") from None


@dataclass(frozen=True)
class Settings:
    """Hub and cache settings, read from the environment at call time."""

    endpoint: str
    hub_cache: Path  # huggingface_hub's cache (HF_HUB_CACHE)
    cache: Path  # ours: converted weights, URL downloads, locks
    offline: bool
    token: str | bool | None
    timeout: float  # one metadata request, and connecting for a download (HF_HUB_ETAG_TIMEOUT)
    download_timeout: float  # the longest silence in the middle of a download (HF_HUB_DOWNLOAD_TIMEOUT)
    download_deadline: float  # one whole download, resumptions included (MED3D_HUB_DOWNLOAD_DEADLINE)
    download_retries: int  # resumptions after the connection was cut (MED3D_HUB_DOWNLOAD_RETRIES)


def _flag(*names: str) -> bool | None:
    values = [os.environ[n] for n in names if n in os.environ]
    return None if not values else any(v.strip().lower() in _TRUE for v in values)


def _seconds(name: str, default: float = DEFAULT_TIMEOUT) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UsageError(f"{name}={raw!r} must be a positive number of seconds")
    return value


_warned_old_env: list[bool] = []  # once per process


def cache_root(hf_home: Path | None = None) -> Path:
    """The one folder the package keeps things in: ``$MED3D_HUB_CACHE``, else ``$HF_HOME/med3d_hub``.

    ``MED3D_CACHE`` (the old training-cache variable) still works, with a deprecation warning (once).
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV]))
    if os.environ.get(OLD_CACHE_ENV):
        if not _warned_old_env:
            _warned_old_env.append(True)
            log.warning(
                "%s is deprecated: set %s instead (the one cache root; the training cache is its train/ folder)",
                OLD_CACHE_ENV,
                CACHE_ENV,
            )
        return Path(os.path.expanduser(os.environ[OLD_CACHE_ENV]))
    if hf_home is None:
        from huggingface_hub import constants

        hf_home = Path(os.path.expanduser(os.environ["HF_HOME"])) if os.environ.get("HF_HOME") else Path(constants.HF_HOME)
    return hf_home / "med3d_hub"


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    if not raw.strip().isdigit():
        raise UsageError(f"{name}={raw!r} must be a whole number >= 0")
    return int(raw)


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
        cache=cache_root(home),
        offline=bool(local_files_only or (constants.HF_HUB_OFFLINE if offline is None else offline)),
        token=token,
        timeout=_seconds("HF_HUB_ETAG_TIMEOUT"),
        download_timeout=_seconds("HF_HUB_DOWNLOAD_TIMEOUT"),
        download_deadline=_seconds(DEADLINE_ENV, DEFAULT_DEADLINE),
        download_retries=_count(RETRIES_ENV, DEFAULT_RETRIES),
    )


# -- hashing -----------------------------------------------------------------------------------------


def is_sha256(text: str) -> bool:
    return bool(_SHA256.fullmatch(text))


_SAMPLES, _SAMPLE_BYTES = 32, 4096


def sample_digest(path: str | os.PathLike) -> str:
    """A sha256 over a file's size and 32 blocks of 4 KiB at evenly spaced offsets: cheap, and different for
    any two weight files that differ in more than a few places. It tells files apart; it proves nothing."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1)))
            digest.update(f.read(_SAMPLE_BYTES))
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


def _keys_digest(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> str:
    """One sha256 over every tensor's name, dtype and shape: the file's layout."""
    text = "\n".join(f"{k}|{dtype}|{','.join(map(str, shape))}" for k, (dtype, shape) in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _data_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """One sha256 over every tensor's bytes, in key order: the file's content, whatever its byte layout."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(tensors[key].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _layout(f) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """(name -> (dtype, shape), data bytes) of an open safetensors file, from its header alone."""
    shapes, nbytes = {}, 0
    for key in f.keys():
        part = f.get_slice(key)
        dtype, shape = str(part.get_dtype()), tuple(part.get_shape())
        shapes[key] = (dtype, shape)
        count = 1
        for n in shape:
            count *= n
        nbytes += count * _DTYPE_BYTES.get(dtype, 0)
    return shapes, nbytes


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _identity_problem(path: Path, sha256: str, f, metadata: Mapping[str, str]) -> str | None:
    """Why a cache file is not the converted copy of the file with this sha256 (None if it is): header checks only."""
    if metadata.get("format") != CACHE_FORMAT:
        return f"written by another version (format {metadata.get('format')!r}, expected {CACHE_FORMAT})"
    if metadata.get("source_sha256") != sha256:
        return f"it holds the weights of sha256 {metadata.get('source_sha256')!r}, not {sha256} (a swapped file)"
    shapes, nbytes = _layout(f)
    if _keys_digest(shapes) != metadata.get("keys_sha256") or str(len(shapes)) != metadata.get("tensors"):
        return "its tensor names, dtypes or shapes differ from those recorded when it was written"
    with open(path, "rb") as raw:
        header = int.from_bytes(raw.read(8), "little")
    if path.stat().st_size != 8 + header + nbytes or str(nbytes) != metadata.get("tensor_bytes"):
        return f"its size is {path.stat().st_size} bytes, expected {8 + header + nbytes} (truncated or padded)"
    return None


def load_cached_weights(sha256: str, s: Settings) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The cached state dict of a weights file (memory-mapped) and its metadata, or None.

    The file must identify itself as the copy of exactly these source bytes: its metadata names
    the source sha256, the tensor layout (names, dtypes, shapes) and the byte count, all checked
    against the header here (cheap, no data read). A file that fails is removed with a warning,
    so the weights are fetched, verified and converted again. ``verify_cache`` re-hashes the data.
    """
    from safetensors import SafetensorError, safe_open

    path = cached_weights_path(sha256, s)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            problem = _identity_problem(path, sha256, f, metadata)
            if problem is None:
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as error:
        problem = f"unreadable: {error}"
    log.warning("removing cached weights %s: %s; they will be fetched, verified and converted again", path, problem)
    path.unlink(missing_ok=True)
    return None


def store_weights(sha256: str, state_dict: Mapping[str, torch.Tensor], s: Settings, metadata: Mapping[str, str]) -> Path | None:
    """Write the state dict as ``<sha256>.safetensors``: temp file, then an atomic rename. None if the cache is read-only.

    The metadata gets the fields that let the file identify itself (see ``load_cached_weights``)
    and the sha256 of its tensor data (for ``verify_cache``).
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    shapes = {k: (_safetensors_dtype(v), tuple(v.shape)) for k, v in tensors.items()}
    identity = {
        "format": CACHE_FORMAT,
        "source_sha256": sha256,
        "keys_sha256": _keys_digest(shapes),
        "tensors": str(len(tensors)),
        "tensor_bytes": str(sum(v.numel() * v.element_size() for v in tensors.values())),
        "data_sha256": _data_digest(tensors),
    }
    path = cached_weights_path(sha256, s)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={**dict(metadata), **identity})
        os.replace(tmp, path)
    except OSError as error:
        log.warning("could not cache converted weights in %s (%s); the next load will convert again", path, error)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _safetensors_dtype(t: torch.Tensor) -> str:
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}  # fmt: skip
    return names.get(t.dtype, str(t.dtype))


def hub_repo_folder(s: Settings, repo_id: str) -> Path:
    """The folder of a model repo in the Hugging Face cache."""
    return s.hub_cache / f"models--{repo_id.replace('/', '--')}"


@dataclass(frozen=True)
class CacheUse:
    """One kind of cached file: where it lies, how many files and bytes."""

    kind: str
    paths: tuple[Path, ...]
    files: int
    bytes: int


def _usage(paths: Sequence[Path]) -> tuple[int, int]:
    files = size = 0
    for path in paths:
        for root, _dirs, names in os.walk(path):
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(root, name))
                    if not os.path.islink(os.path.join(root, name)):
                        files, size = files + 1, size + st.st_size
    return files, size


def cache_kinds(s: Settings, repo_ids: Sequence[str] = ()) -> dict[str, tuple[Path, ...]]:
    """Each kind of cached file and its folders: ours (``CACHE_KINDS``), and ``hub``, the Hugging Face cache's
    copies of ``repo_ids`` (the repos the manifests name)."""
    kinds = {kind: (s.cache / kind,) for kind in CACHE_KINDS}
    kinds["hub"] = tuple(hub_repo_folder(s, r) for r in sorted(set(repo_ids)))
    return kinds


def cache_usage(s: Settings, repo_ids: Sequence[str] = ()) -> list[CacheUse]:
    """Files and bytes per kind of cached file (see ``cache_kinds``)."""
    return [CacheUse(kind, paths, *_usage(paths)) for kind, paths in cache_kinds(s, repo_ids).items()]


def clear_cache(s: Settings, kinds: Sequence[str], repo_ids: Sequence[str] = ()) -> list[CacheUse]:
    """Remove the cached files of ``kinds``; returns what was removed. Everything comes back on the next load."""
    import shutil

    known = cache_kinds(s, repo_ids)
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise UsageError(f"unknown cache kind(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    removed = []
    for kind in kinds:
        paths = known[kind] + ((s.cache / "hashes",) if kind == "weights" else ())  # hashes: an older version's memo
        removed.append(CacheUse(kind, known[kind], *_usage(paths)))
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
    return removed


def verify_cache(s: Settings, repo_ids: Sequence[str] = (), *, remove: bool = True) -> list[tuple[Path, str | None]]:
    """Re-hash every cached file: (file, problem or None) for each; bad files are removed unless ``remove=False``.

    Converted weights: the header checks of ``load_cached_weights`` and the sha256 of the tensor
    data against the one recorded when the file was written. Mirror downloads: the file's sha256
    against the folder it is filed under. Hugging Face cache blobs of ``repo_ids`` named by a
    sha256 (LFS files): their sha256 against their name, and a bad blob's snapshot links go too.
    """
    from safetensors import SafetensorError, safe_open

    report: list[tuple[Path, str | None]] = []
    for path in sorted((s.cache / "weights").glob("*.safetensors")):
        sha = path.name[: -len(".safetensors")]
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                problem = _identity_problem(path, sha, f, metadata)
                if problem is None and _data_digest({k: f.get_tensor(k) for k in f.keys()}) != metadata.get("data_sha256"):
                    problem = "its tensor data differ from those written (bit rot or a changed file)"
        except (SafetensorError, OSError, ValueError) as error:
            problem = f"unreadable: {error}"
        report.append((path, problem))
        if problem and remove:
            path.unlink(missing_ok=True)
    for path in sorted((s.cache / "downloads").glob("*/*")):
        if path.is_file() and not path.name.startswith("."):
            actual = sha256_file(path)
            problem = None if actual == path.parent.name else f"sha256 {actual}, expected {path.parent.name}"
            report.append((path, problem))
            if problem and remove:
                path.unlink(missing_ok=True)
    for repo_id in sorted(set(repo_ids)):
        folder = hub_repo_folder(s, repo_id)
        for blob in sorted((folder / "blobs").glob("*")):
            if _SHA256.fullmatch(blob.name) and blob.is_file():
                actual = sha256_file(blob)
                problem = None if actual == blob.name else f"sha256 {actual}, expected {blob.name}"
                report.append((blob, problem))
                if problem and remove:
                    for root, _dirs, names in os.walk(folder / "snapshots"):
                        for name in names:
                            entry = Path(root) / name
                            if entry.is_symlink() and os.path.realpath(entry) == str(blob.resolve()):
                                entry.unlink(missing_ok=True)
                    blob.unlink(missing_ok=True)
    return report


def clean_stale_temporaries(s: Settings, f: HubFile | None = None, *, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporary files killed processes left: dot-named ``*.incomplete``/``*.tmp`` untouched for ``older_than_s``.

    Looked for in our cache (converted weights, mirror downloads) and, for ``f``, in its repo's
    blob folder of the Hugging Face cache. A live writer keeps touching its file, and every download
    is bounded by a deadline, so a file this old has no writer; a file whose lock is held is kept
    anyway. Best effort: errors are ignored.
    """
    import time

    folders = [s.cache / "weights", s.cache / "hashes"]
    with contextlib.suppress(OSError):
        folders += [p for p in (s.cache / "downloads").iterdir() if p.is_dir()]
    hf_blobs = s.hub_cache / f"models--{f.repo_id.replace('/', '--')}" / "blobs" if f is not None else None
    if hf_blobs is not None:
        folders.append(hf_blobs)
    removed: list[Path] = []
    cutoff = time.time() - older_than_s
    for folder in folders:
        try:
            candidates = [p for p in folder.iterdir() if p.name.endswith((".incomplete", ".tmp"))]
        except OSError:
            continue
        for path in candidates:
            if folder == hf_blobs:  # huggingface_hub: blobs/<etag>.incomplete under .locks/<repo>/<etag>.lock
                lock = s.hub_cache / ".locks" / folder.parent.name / f"{path.name.split('.')[0]}.lock"
            else:  # ours: .<sha256>.safetensors.<id>.incomplete under locks/<sha256>.lock
                lock = s.cache / "locks" / f"{path.name.lstrip('.').split('.')[0]}.lock"
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff and not _locked(lock):
                    path.unlink()
                    removed.append(path)
                    log.info("removed %s, left by an interrupted write", path)
    return removed


def _locked(lock: Path) -> bool:
    """Whether another process holds this lock file now (False when it does not exist)."""
    from filelock import FileLock, Timeout

    if not lock.is_file():
        return False
    try:
        with FileLock(str(lock), timeout=0):
            return False
    except Timeout:
        return True
    except OSError:
        return False


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
        raise UsageError(f"{label}: no source to download from")
    failures: list[tuple[str, OSError]] = []
    for source in sources:
        try:
            if isinstance(source, HubFile):
                return _fetch_hub(source, s, expected_sha256, skip_if)
            if expected_sha256 is None:
                raise UsageError(f"{label}: a URL source needs a sha256 to check the download against")
            return _fetch_url(source, s, expected_sha256)
        except (HubUnreachableError, ChecksumError, WeightsDownloadError) as error:
            error.args = (redact(error),)  # a server may echo the Authorization header in its answer
            failures.append((redact(source), error))
            if len(sources) > 1:
                log.warning("could not get %s from %s: %s", label, redact(source), error)
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


def transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors huggingface_hub's HTTP client can raise, for ``except`` clauses.

    Its transport changed with each generation: requests in 0.x (whose errors are OSErrors), httpx in
    1.x, httpx2 in 2.x (each with a ``TransportError``). They are read from the modules already
    loaded, so no transport is imported, and none is needed that the installed client lacks.
    """
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "TransportError", None), type):
            errors.append(module.TransportError)
    return tuple(errors)


def resolve_url(f: HubFile, endpoint: str) -> str:
    """The Hub protocol's address of one file at one revision on ``endpoint``.

    Built here rather than by ``hf_hub_url``: huggingface_hub 0.x starts from the endpoint it read at
    import time and swaps in ``endpoint`` only when the two agree on their prefix.
    """
    return f"{endpoint.rstrip('/')}/{f.repo_id}/resolve/{quote(f.revision, safe='')}/{quote(f.filename)}"


def _fetch_hub(f: HubFile, s: Settings, expected: str | None, skip_if: Callable[[str], bool] | None) -> Fetched:
    url = resolve_url(f, s.endpoint)
    if s.offline:
        path = _from_hf_cache(f, s)
        if path is not None:
            return _verify_hf(path, f, s, expected, where=str(path))
        known = expected or _converted_sha256(f, s)
        if known and skip_if is not None and skip_if(known):
            return Fetched(None, known, str(cached_weights_path(known, s)))
        raise HubUnreachableError(
            f"{f} is not in the Hugging Face cache {s.hub_cache}, and offline mode is on "
            "(HF_HUB_OFFLINE or local_files_only), so it was not downloaded from "
            f"{url}."
        )

    # One bounded request tells whether the server is there, and what it holds.
    try:
        meta = _probe(url, s)
    except _Refused as refused:
        if refused.status >= 500:
            return _unreachable(f, s, url, f"HTTP {refused.status}", expected)
        raise _not_served(f, url, refused) from None
    except HubUnreachableError as error:
        return _unreachable(f, s, url, str(error), expected)
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
        _remember_converted(f, want, s)
        return Fetched(None, want, url)
    fetched = _hf_download(f, s, url, meta, want)
    _remember_converted(f, fetched.sha256, s)
    return fetched


@dataclass(frozen=True)
class _Remote:
    """What a Hub says about a file before sending it (the headers huggingface_hub reads too)."""

    commit_hash: str | None
    etag: str | None
    size: int | None


class _Refused(Exception):
    """The Hub answered with an error status; ``code`` is its X-Error-Code (RepoNotFound, EntryNotFound...)."""

    def __init__(self, status: int, code: str | None):
        super().__init__(f"HTTP {status} {code or ''}".strip())
        self.status, self.code = status, code


def _probe(url: str, s: Settings) -> _Remote:
    """One HEAD request, without retries: ``HF_HUB_ETAG_TIMEOUT`` bounds it on every huggingface_hub version.

    Redirects within the Hub are followed; one to another host (a CDN) is not: the Hub's answer already
    carries the file's commit, ETag and size. Raises ``_Refused`` for an error status and
    ``HubUnreachableError`` when no answer came.
    """
    import requests
    from huggingface_hub.utils import build_hf_headers

    headers = {**build_hf_headers(token=s.token), "Accept-Encoding": "identity"}
    for _ in range(5):
        try:
            response = requests.head(url, headers=headers, allow_redirects=False, timeout=s.timeout)
        except requests.RequestException as error:
            raise HubUnreachableError(_reason(error)) from None
        location = response.headers.get("Location", "")
        if 300 <= response.status_code < 400 and location and not urlsplit(location).netloc:
            url = urljoin(url, location)
            continue
        break
    if response.status_code >= 400:
        raise _Refused(response.status_code, response.headers.get("X-Error-Code"))
    h = response.headers
    etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").removeprefix("W/").strip('"') or None
    size = h.get("X-Linked-Size") or h.get("Content-Length")
    return _Remote(h.get("X-Repo-Commit"), etag, int(size) if size and size.isdigit() else None)


def _hub_file_key(f: HubFile) -> str:
    return hashlib.sha256(f"{f.repo_id}|{f.revision}|{f.filename}".encode()).hexdigest()


def _remember_converted(f: HubFile, sha256: str, s: Settings) -> None:
    """Note which bytes a Hub file held, so offline mode finds their converted copy without the original."""
    memo = s.cache / "hub-files" / _hub_file_key(f)
    try:
        with atomic_write(memo, "w") as handle:
            handle.write(sha256)
    except OSError:  # a read-only cache: offline loads then need the Hugging Face cache
        pass


def _converted_sha256(f: HubFile, s: Settings) -> str | None:
    try:
        known = (s.cache / "hub-files" / _hub_file_key(f)).read_text().strip()
    except OSError:
        return None
    return known if _SHA256.fullmatch(known) else None


_CACHE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]*")


def _hf_download(f: HubFile, s: Settings, url: str, meta: _Remote, want: str | None) -> Fetched:
    """Download a Hub file into huggingface_hub's cache layout, checked before it enters the cache.

    The layout is the client's documented one (``models--org--name/blobs/<etag>``, a
    ``snapshots/<commit>/<file>`` link to it, ``refs/<branch>``), so its offline mode, ``scan_cache_dir``
    and ``hf cache`` see the file. The bytes travel through ``_download``, which bounds the transfer the
    same way whatever huggingface_hub generation is installed.
    """
    from huggingface_hub.utils import build_hf_headers

    etag, commit = meta.etag or "", meta.commit_hash or ""
    if not _CACHE_NAME.fullmatch(etag) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise WeightsDownloadError(
            f"cannot download {url}: the server's answer names no usable ETag ({etag!r}) or commit ({commit!r})"
        )
    repo_dir = s.hub_cache / ("models--" + f.repo_id.replace("/", "--"))
    blob = repo_dir / "blobs" / etag
    pointer = _inside(repo_dir / "snapshots" / commit, f.filename, url)
    if blob.is_file():
        _link(pointer, blob)
        return _verify_hf(str(pointer), f, s, want, where=url)
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp = blob.with_name(f"{blob.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        actual = _download(url, tmp, s, headers=build_hf_headers(token=s.token), size=meta.size)
        if want is not None and actual != want:
            raise _mismatch(
                f"{f.filename} ({f}, from {url})",
                want,
                actual,
                (),
                "The download was corrupted or the server holds other bytes than it reports; retry, or check the mirror.",
            )
        os.replace(tmp, blob)
    finally:
        tmp.unlink(missing_ok=True)
    _link(pointer, blob)
    if f.revision != commit:
        ref = _inside(repo_dir / "refs", f.revision, url)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    if want is None:
        log.warning("the Hub reported no sha256 for %s; it is loaded without a content check", f)
    return Fetched(pointer, actual, url)


def _inside(folder: Path, relative: str, url: str) -> Path:
    """``folder / relative``, refused when it would land outside ``folder``."""
    path = folder / relative
    if relative.startswith("/") or ".." in Path(relative).parts or not os.path.abspath(path).startswith(
        os.path.abspath(folder) + os.sep
    ):
        raise WeightsDownloadError(f"cannot download {url}: {relative!r} would be written outside {folder}")
    return path


def _link(pointer: Path, blob: Path) -> None:
    """Point a snapshot entry at its blob: a relative link, or a copy where links are not allowed."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
        os.replace(tmp, pointer)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


class _Cut(Exception):
    """The server ended a response before the whole file arrived."""


def _download(url: str, dest: Path, s: Settings, *, headers: Mapping[str, str] | None = None, size: int | None = None) -> str:
    """GET ``url`` into ``dest`` (created or truncated) and return the sha256 of its bytes.

    Streamed to disk a read at a time, so memory stays flat. Every download ends, whatever the server
    does: ``HF_HUB_DOWNLOAD_TIMEOUT`` of silence ends it (a stalled server is not asked again), a cut
    connection is resumed with a Range request (from the start when the server ignores Range) at most
    ``MED3D_HUB_DOWNLOAD_RETRIES`` times, and ``MED3D_HUB_DOWNLOAD_DEADLINE`` bounds the whole.
    """
    import requests
    import urllib3

    started = time.monotonic()
    deadline = started + s.download_deadline
    base = {**(headers or {}), "Accept-Encoding": "identity"}
    digest, done, cuts, answered = hashlib.sha256(), 0, 0, False

    def stopped(what: str) -> HubUnreachableError:
        got = f"{done} of {size} bytes" if size else f"{done} bytes"
        return HubUnreachableError(
            f"the download of {url} was stopped: {what} ({got}, {cuts} cut(s), {time.monotonic() - started:.1f} s). "
            f"Limits: {s.download_timeout:g} s of silence (HF_HUB_DOWNLOAD_TIMEOUT), {s.download_retries} "
            f"resumption(s) after a cut ({RETRIES_ENV}), {s.download_deadline:g} s in all ({DEADLINE_ENV}); "
            "raise them for a slow link. Nothing was kept."
        )

    bar = _progress_bar(url, size)
    with open(dest, "wb") as out, bar:
        while True:
            request_headers = {**base, "Range": f"bytes={done}-"} if done else base
            try:
                with requests.get(
                    url, headers=request_headers, stream=True, timeout=(s.timeout, s.download_timeout)
                ) as response:
                    answered = True
                    if response.status_code >= 500:
                        raise _Cut(f"HTTP {response.status_code}")
                    if response.status_code >= 400:
                        raise WeightsDownloadError(f"cannot download {url}: the server answered HTTP {response.status_code}")
                    if done and response.status_code != 206:  # Range ignored: the whole file comes again
                        out.seek(0)
                        out.truncate()
                        digest, done = hashlib.sha256(), 0
                        bar.reset(total=size)
                    if size is None and response.status_code == 200 and response.headers.get("Content-Length", "").isdigit():
                        size = int(response.headers["Content-Length"])
                        bar.reset(total=size)
                    read = getattr(response.raw, "read1", response.raw.read)
                    while chunk := read(_READ):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
                        if time.monotonic() > deadline:
                            raise stopped(f"the deadline of {s.download_deadline:g} s passed")
                if size is None or done == size:
                    return digest.hexdigest()
                if done > size:
                    raise WeightsDownloadError(f"cannot download {url}: the server sent more than the {size} bytes it announced")
                raise _Cut("the server closed the connection early")
            except (requests.Timeout, urllib3.exceptions.TimeoutError) as error:
                raise stopped(f"the server went silent ({type(error).__name__})") from None
            except (_Cut, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
                if isinstance(error, HubUnreachableError | WeightsDownloadError):
                    raise
                if not answered:
                    raise HubUnreachableError(
                        f"could not reach {url} (timeout {s.timeout:g} s): {_reason(error)}."
                    ) from None
                cuts += 1
                if cuts > s.download_retries:
                    raise stopped(f"the connection was cut too often, last: {_reason(error)}") from None
                if time.monotonic() > deadline:
                    raise stopped(f"the deadline of {s.download_deadline:g} s passed") from None
                log.warning("the download of %s was cut after %d bytes (%s); resuming", url, done, _reason(error))


def _progress_bar(url: str, size: int | None):
    """huggingface_hub's own progress bar, named after the file: shown on stderr unless bars are off
    (``HF_HUB_DISABLE_PROGRESS_BARS``, ``huggingface_hub.utils.disable_progress_bars``, ``med3d -q``)."""
    from huggingface_hub.utils import tqdm

    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or url
    return tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=True)


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


def _not_served(f: HubFile, url: str, refused: _Refused) -> WeightsDownloadError:
    """The Hub's refusal in words, from its X-Error-Code (the header huggingface_hub maps to its error classes)."""
    if refused.code == "GatedRepo":
        what = f"{f.repo_id} is gated: accept its conditions on the Hub and set HF_TOKEN"
    elif refused.code == "RepoNotFound":
        what = f"repo {f.repo_id} was not found (or is private: set HF_TOKEN)"
    elif refused.code == "RevisionNotFound":
        what = f"revision {f.revision!r} does not exist in {f.repo_id}"
    elif refused.code == "EntryNotFound":
        what = f"{f.filename} does not exist in {f.repo_id}@{f.revision}"
    else:
        hint = "; check HF_TOKEN" if refused.status in (401, 403) else ""
        what = f"the server refused it (HTTP {refused.status}){hint}"
    return WeightsDownloadError(f"cannot download {url}: {what}")


def _from_hf_cache(f: HubFile, s: Settings) -> str | None:
    """The cached copy of a Hub file at its revision, without any network call; None if there is none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

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
    """A manifest mirror outside the Hub: downloaded by ``_download``, renamed into place once verified."""
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

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        actual = _download(url, tmp, s)
        if actual != expected:
            raise _mismatch(f"{name} from {url}", expected, actual, (), "The mirror serves other bytes; check it.")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return Fetched(final, actual, url)
