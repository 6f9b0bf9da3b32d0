"""The fast inference path: the same outputs, less work per volume.

Two rewrites that never change a result beyond float rounding: BatchNorm folded into the conv
before it (eval-mode BN is an affine map per channel), and the channels_last_3d memory format,
which oneDNN and cuDNN run faster for 3D convs. `torch.compile` is optional: it pays off only over
many volumes and needs a working compiler toolchain, so a failure falls back to eager.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

# (conv, bn) attribute pairs of the stem and the blocks.
_CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm3d into the Conv3d that feeds it, in place."""
    for module in model.modules():
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
        if isinstance(module, nn.Sequential) and len(module) >= 2:
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv3d) and isinstance(module[i + 1], nn.BatchNorm3d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
    return model


class _CompiledWithFallback(nn.Module):
    """`torch.compile` fails lazily, at the first call: fall back to eager there, once."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._compiled = torch.compile(model, dynamic=False)

    def forward(self, x: torch.Tensor):
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except Exception as err:  # no compiler toolchain, unsupported platform...
                log.warning("torch.compile failed (%s); using the eager fast path", err)
                self._compiled = None
        return self.model(x)


def optimize_for_inference(model: nn.Module, *, compile: bool = False, inplace: bool = False) -> nn.Module:
    """An eval-only copy of `model` with BatchNorm folded and channels_last_3d weights.

    Outputs equal the plain eval model's within float rounding (the tests hold them to 1e-4
    relative). Convs with channels_last_3d weights produce channels_last_3d activations, so the
    whole network runs in that layout without touching the caller's input. `compile=True` adds
    `torch.compile` and falls back to eager, with a warning, where compilation fails. The result
    is for inference only: it has no BatchNorm left to train.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    fold_batchnorm(model)
    model.to(memory_format=torch.channels_last_3d)
    return _CompiledWithFallback(model) if compile else model
