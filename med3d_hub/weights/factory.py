"""The one door to a model: `create_model` builds the network by name, then asks the loader for weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..networks.registry import split_name
from .hub_model import build_model


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
