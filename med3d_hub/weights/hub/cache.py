"""Our cache: converted weights (``weights/<sha256>.safetensors``), its upkeep, and the locks around it.

Each converted file names its source in its metadata, checked at every load (``load_cached_weights``)
and re-hashed by ``verify_cache``; ``cache_usage``/``clear_cache`` serve ``med3d cache``;
``clean_stale_temporaries`` removes what killed processes left; ``weights_lock`` makes concurrent
loaders fetch and convert once.
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
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch

from ...errors import UsageError
from ...files import sha256_file
from .environment import Settings, hub_repo_folder

if TYPE_CHECKING:
    from .names import HubFile

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "CACHE_KINDS",
    "CacheUse",
    "cache_kinds",
    "cache_usage",
    "cached_weights_path",
    "clean_stale_temporaries",
    "clear_cache",
    "is_sha256",
    "load_cached_weights",
    "sample_digest",
    "store_weights",
    "verify_cache",
    "weights_lock",
]


CACHE_KINDS = ("weights", "downloads", "train")  # the folders of the cache root that `med3d cache` manages
CACHE_FORMAT = "med3d_hub.state_dict.v2"
STALE_AFTER_S = 6 * 3600.0  # a temporary file untouched this long belongs to a killed process
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
            if is_sha256(blob.name) and blob.is_file():
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
