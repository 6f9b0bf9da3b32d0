"""The model classes users hold, and `build_model`, which makes them with random weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UsageError
from ..networks.registry import FEATURE_ARGS, MODEL_ARGS
from ..networks.resnet import ARCHITECTURES, Med3DResNet, Med3DResNetFeatures


def build_model(arch: str, *, features_only: bool = False, out_indices=(1, 2, 3, 4), **kwargs: Any) -> nn.Module:
    """Build architecture `arch` with random weights; kwargs are the model's options."""
    unknown = set(kwargs) - MODEL_ARGS
    if unknown:
        raise UsageError(
            f"unknown argument(s) {sorted(unknown)} for {arch}; accepted: {sorted(MODEL_ARGS | FEATURE_ARGS)}"
        )
    spec = ARCHITECTURES[arch]
    kwargs.setdefault("shortcut", spec["shortcut"])
    if features_only:
        return Med3DResNetFeatures(spec["block"], spec["layers"], out_indices=out_indices, **kwargs)
    return Med3DResNet(spec["block"], spec["layers"], **kwargs)
