"""The co-training network: one shared Med3D encoder, one small decoder branch per dataset.

As in the paper, a branch is a 1x1x1 convolution from the layer4 features to that dataset's
classes, followed by trilinear upsampling to the input size. A micro-batch holds crops of one
dataset and runs through that dataset's branch only.

In training mode the forward also adds ``0 * sum(parameters of the other branches)`` to the
logits. The value is unchanged, but every parameter is in every step's graph and receives a
gradient (zero for an unused branch). That keeps DistributedDataParallel's gradient all-reduce
complete on every rank without ``find_unused_parameters``, and makes one process and many
processes update the same parameters in the same way (a branch that no micro-batch of a step
used still gets its momentum and weight-decay update, everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..weights.factory import create_model

__all__ = ["CoTrainNet"]


class CoTrainNet(nn.Module):
    """``encoder`` (the zoo's backbone, same keys) + ``branches[task_name]`` (1x1x1 convs)."""

    def __init__(self, arch: str, task_names: Sequence[str], task_classes: Sequence[int], **encoder_kwargs):
        super().__init__()
        if len(task_names) != len(task_classes) or not task_names:
            raise UsageError("give one class count per task, and at least one task")
        self.arch = arch
        self.task_names = list(task_names)
        self.encoder = create_model(arch, num_classes=0, **encoder_kwargs)
        channels = self.encoder.num_features
        self.branches = nn.ModuleDict({name: nn.Conv3d(channels, n, kernel_size=1) for name, n in zip(task_names, task_classes)})
        for branch in self.branches.values():
            nn.init.normal_(branch.weight, std=0.01)  # small logits at the start, like timm's heads
            nn.init.zeros_(branch.bias)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of dataset ``task`` (its index), at the input's size: N x classes x D x H x W."""
        features = self.encoder.forward_features(x)
        name = self.task_names[task]
        logits = self.branches[name](features)
        logits = F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
        if self.training and len(self.branches) > 1:
            untouched = [p.sum() for other, b in self.branches.items() if other != name for p in b.parameters()]
            logits = logits + 0.0 * torch.stack(untouched).sum().to(logits.dtype)
        return logits
