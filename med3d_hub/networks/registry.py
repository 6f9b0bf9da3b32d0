"""Model names: listing and checking them never builds a network (that is `weights.factory`).

A name is `resnet{depth}`, optionally followed by a weights tag: `resnet50.3dseg8`. The
architecture table lives in `networks.resnet.ARCHITECTURES`; listing models never builds one.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect

from ..errors import UsageError
from .resnet import ARCHITECTURES, Med3DResNet

# the network's options, in the order of its constructor (block and layers come from the name)
MODEL_ARGS = tuple(p for p in inspect.signature(Med3DResNet.__init__).parameters if p not in ("self", "block", "layers"))
FEATURE_ARGS = frozenset({"features_only", "out_indices"})
TIMM_PREFIX = "med3d_"  # timm's registry names the zoo's models med3d_resnet{depth}; config.json's "architecture" is that name


def list_models(pattern: str | None = None) -> list[str]:
    """Model names, in order of depth; `pattern` is an fnmatch pattern such as `"resnet1*"`."""
    names = list(ARCHITECTURES)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def architecture_of(block: str, layers) -> str | None:
    """``"resnet50"`` for a bottleneck network with blocks 3-4-6-3; None for a layout outside the zoo."""
    layers = tuple(layers)
    return next((name for name, spec in ARCHITECTURES.items() if spec["block"] == block and spec["layers"] == layers), None)


def split_name(name: str) -> tuple[str, str | None]:
    """`"resnet50.3dseg8"` -> `("resnet50", "3dseg8")`; raises a helpful error for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string such as 'resnet50', got {type(name).__name__}")
    arch, _, tag = name.partition(".")
    if arch not in ARCHITECTURES:
        close = difflib.get_close_matches(arch, list(ARCHITECTURES), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        depths = ", ".join(n.removeprefix("resnet") for n in ARCHITECTURES)
        raise UsageError(f"unknown model {name!r}: Med3D ResNets come in depths {depths} (names resnet10 ... resnet200).{hint}")
    return arch, (tag or None)
