"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the trainer writes (checkpoints, cache entries, metrics rewrites, the exported encoder,
plots) goes through ``atomic_write``: the bytes go to a temporary file in the same folder, which
is then renamed over the target. A process killed at any instant (SIGKILL included) leaves at
most a stray ``*.tmp-*`` file, which the next writer of that name ignores.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "fsync_dir"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` in one rename.

    ``fsync=True`` also flushes the data and the folder entry to disk, so the file survives a
    machine crash, not only a killed process (used for checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


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
