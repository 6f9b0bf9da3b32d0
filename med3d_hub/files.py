"""Small file helpers every layer shares: atomic writes, the sha256 of a file, reading a JSON file.

Every file the package writes (checkpoints, cache entries, metrics rewrites, features, manifests,
plots) goes through ``atomic_write``: the bytes go to a temporary file in the same folder, which
is then renamed over the target. A reader sees the old file or the new one, never half of one; a
process killed at any instant (SIGKILL included) leaves at most a stray ``.<name>.*.tmp`` file, which the
next writer of that name ignores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_folder", "atomic_write", "fsync_dir", "read_json", "sha256_file"]

_CHUNK = 8 << 20


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` in one rename.

    A file that is replaced keeps its permission bits. ``fsync=True`` also flushes the data and the
    folder entry to disk, so the file survives a machine crash, not only a killed process.
    Text modes write UTF-8.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path``; on success it becomes ``path`` (new or empty) in one rename.

    An interrupted writer leaves no half-filled ``path``, only a stray ``.<name>.*.partial`` folder
    that nothing reads. The caller checks beforehand that ``path`` is new or an empty folder.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or unlink in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """A JSON file's content, or ``default`` when it is missing or not valid JSON (cache metadata)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
