"""`python -m med3d_hub.fid` and `torchrun -m med3d_hub.fid`: `med3d fid`, with the inputs shared out over the ranks.

The arguments are those of `med3d fid` (the same parser); this package is only the entry point.
"""

import sys

from ..cli.app import main as _main

__all__ = ["main"]


def main(argv=None) -> int:
    """Run `med3d fid` with ``argv`` (default: the command line); returns the exit code."""
    return _main(["fid", *(sys.argv[1:] if argv is None else argv)])
