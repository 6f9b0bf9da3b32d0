"""`python -m med3d_hub.train` (and torchrun -m med3d_hub.train): the co-training command.

The training code lives in med3d_hub.training; this package is only the entry point.
"""

from ..cli.train import main

__all__ = ["main"]
