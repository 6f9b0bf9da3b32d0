"""How the `med3d` command speaks: its name, informational lines, warnings, one-line errors."""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_FAILED, EXIT_OK

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


def failed_inputs_code(failures: list, total: int, outcome: str) -> int:
    """The exit code of a run over inputs: 1 when some failed (results or names; ``outcome``: what became of them), else 0."""
    if not failures:
        return EXIT_OK
    print(f"{PROG}: {len(failures)} of {total} input(s) failed and {outcome}: "
          + ", ".join(getattr(r, "name", r) for r in failures),
          file=sys.stderr)
    return EXIT_FAILED
