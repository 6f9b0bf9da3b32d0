"""`python -m med3d_hub.predict` and `torchrun -m med3d_hub.predict`: `med3d predict`, with the inputs shared out over the ranks.

The arguments are those of `med3d predict` (the same parser); this package is only the entry point.
Importing it makes Python bind ``med3d_hub.predict`` to this module, the name of the public function
`med3d_hub.predict` too, so the module is callable: ``med3d_hub.predict(model, inputs)`` calls
`med3d_hub.inference.predict.predict` whichever of the two was imported first.
"""

import sys
import types

from ..cli.app import main as _main
from ..inference.predict import predict as _predict

__all__ = ["main"]


def main(argv=None) -> int:
    """Run `med3d predict` with ``argv`` (default: the command line); returns the exit code."""
    return _main(["predict", *(sys.argv[1:] if argv is None else argv)])


class _PredictModule(types.ModuleType):
    """This module, callable as the function `med3d_hub.predict` whose name it takes."""

    def __call__(self, *args, **kwargs):
        return _predict(*args, **kwargs)


sys.modules[__name__].__class__ = _PredictModule
