"""How the `med3d` command speaks: its name, informational lines, warnings, one-line errors."""

from __future__ import annotations

import argparse
import sys

PROG = "med3d"


def one_line(message) -> str:
    """A message as one line, with any token redacted: how errors and skipped inputs are printed."""
    from ..weights.hub import redact

    return "; ".join(part.strip() for part in redact(message).splitlines() if part.strip())


def say(args: argparse.Namespace, *lines: str) -> None:
    """Informational output (stdout); --quiet silences it."""
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line, flush=True)


def warn(message: str) -> None:
    from ..weights.hub import redact

    print(f"{PROG}: warning: {redact(message)}", file=sys.stderr, flush=True)


def report_skipped(error: str) -> None:
    """An input that failed, said as it happens; the others go on."""
    print(f"{PROG}: skipped {one_line(error)}", file=sys.stderr, flush=True)
