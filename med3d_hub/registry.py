"""Model names and the one factory, `create_model`.

A name is `resnet{depth}`, optionally followed by a weights tag: `resnet50.3dseg8`. The
architecture table lives in `models.resnet.ARCHITECTURES`; listing models never builds one.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any

from torch import nn

from .models.resnet import ARCHITECTURES, Med3DResNet, Med3DResNetFeatures

MODEL_ARGS = frozenset(inspect.signature(Med3DResNet.__init__).parameters) - {"self", "block", "layers"}
FEATURE_ARGS = frozenset({"features_only", "out_indices"})


def list_models(pattern: str | None = None) -> list[str]:
    """Model names, in order of depth; `pattern` is an fnmatch pattern such as `"resnet1*"`."""
    names = list(ARCHITECTURES)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def split_name(name: str) -> tuple[str, str | None]:
    """`"resnet50.3dseg8"` -> `("resnet50", "3dseg8")`; raises a helpful error for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string such as 'resnet50', got {type(name).__name__}")
    arch, _, tag = name.partition(".")
    if arch not in ARCHITECTURES:
        close = difflib.get_close_matches(arch, list(ARCHITECTURES), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        depths = ", ".join(n.removeprefix("resnet") for n in ARCHITECTURES)
        raise ValueError(f"unknown model {name!r}: Med3D ResNets come in depths {depths} (names resnet10 ... resnet200).{hint}")
    return arch, (tag or None)


def build_model(arch: str, *, features_only: bool = False, out_indices=(1, 2, 3, 4), **kwargs: Any) -> nn.Module:
    """Build architecture `arch` with random weights; kwargs are the model's options."""
    unknown = set(kwargs) - MODEL_ARGS
    if unknown:
        raise ValueError(
            f"unknown argument(s) {sorted(unknown)} for {arch}; accepted: {sorted(MODEL_ARGS | FEATURE_ARGS)}"
        )
    spec = ARCHITECTURES[arch]
    kwargs.setdefault("shortcut", spec["shortcut"])
    if features_only:
        return Med3DResNetFeatures(spec["block"], spec["layers"], out_indices=out_indices, **kwargs)
    return Med3DResNet(spec["block"], spec["layers"], **kwargs)


def create_model(name: str, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """Build a Med3D ResNet by name, optionally with pretrained weights.

    Args:
        name: `resnet{10,18,34,50,101,152,200}`, optionally with a weights tag (`resnet50.3dseg8`).
        pretrained: False for random weights; True for the tag's (or the depth's default) weights;
            a local file path or an `hf://org/repo@rev/file` reference.
        **kwargs: `num_classes`, `seg_classes`, `seg_upsample`, `in_chans`, `shortcut`, `dilated`,
            `drop_rate`, `drop_path_rate`, `features_only`, `out_indices`.
    """
    arch, tag = split_name(name)
    if pretrained is False or pretrained is None:
        return build_model(arch, **kwargs)  # its pretrained_cfg holds timm's data keys and no weights (no sha256)
    from .pretrained import create_pretrained  # the Hub layer loads only when weights are asked for

    return create_pretrained(arch, tag, pretrained, **kwargs)
