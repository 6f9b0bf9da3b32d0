"""The training process itself: console output, stop signals, the output folder's lock, and rank 0's
decisions handed to every rank."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from ..inference.distributed import DistContext

__all__ = ["Printer", "StopRequest", "agree", "lock_output", "worker_init"]


class Printer:
    """Rank-0 console output that cooperates with the progress bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)


class StopRequest:
    """SIGTERM / SIGINT ask for a checkpoint at the end of the current step, then a clean exit."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def install(self) -> None:
        if not _in_main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: stop now
            self.restore()
            signal.raise_signal(signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def worker_init(worker_id: int) -> None:
    """Loader workers take the default signal handling back (they are forked from the trainer)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def lock_output(out: Path):
    """Hold ``out/.lock`` for the life of this process: two runs must not write one folder.

    A POSIX record lock (``lockf``): it belongs to this process only, so the data loader's forked
    workers do not keep it alive after this process ends, and the OS drops it on any exit.
    """
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return handle
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CheckpointError(
            f"another training process is using {out} (it holds {out / '.lock'}); wait for it to end, "
            "or choose another --output folder"
        ) from None
    return handle


def agree(ctx: DistContext, fn):
    """Run ``fn`` on rank 0 and hand its result, or its error, to every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except (CheckpointError, ConfigError, OSError) as err:
            error = f"{type(err).__name__}: {err}" if isinstance(err, OSError) else str(err)
    result, error = ctx.broadcast_object((result, error))
    if error:
        raise CheckpointError(error)
    return result
