"""The fine-tuning network: a Med3D encoder and a new head, as ``med3d finetune`` trains it.

- Segmentation, ``decoder: paper``: the paper's decoder for its lung segmentation transfer: three
  groups of [transposed conv (kernel 2, stride 2) + BN + ReLU, 3x3x3 conv + BN + ReLU] take the
  layer4 features (output stride 8) back to the input's size, then a 1x1x1 conv gives the classes.
- Segmentation, ``decoder: conv_seg``: upstream MedicalNet's head (the zoo's ``SegmentationHead``,
  output at 1/4 of the input), upsampled trilinearly to the input's size.
- Classification: global average pooling of layer4, optional dropout, one linear layer.

It lives with the networks (not with the training) so that a finished run can be rebuilt and
applied (``med3d predict``) without the training code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import SegmentationHead

__all__ = ["FinetuneNet", "PaperDecoder", "PAPER_DECODER_CHANNELS"]

PAPER_DECODER_CHANNELS = (256, 128, 64)


class PaperDecoder(nn.Sequential):
    """3 x (ConvTranspose3d 2/2 + BN + ReLU + Conv3d 3x3x3 + BN + ReLU), then a 1x1x1 conv to the classes."""

    def __init__(self, in_channels: int, num_classes: int, channels=PAPER_DECODER_CHANNELS):
        layers: list[nn.Module] = []
        c = in_channels
        for out in channels:
            layers += [
                nn.ConvTranspose3d(c, out, kernel_size=2, stride=2, bias=False), nn.BatchNorm3d(out), nn.ReLU(inplace=True),
                nn.Conv3d(out, out, kernel_size=3, padding=1, bias=False), nn.BatchNorm3d(out), nn.ReLU(inplace=True),
            ]
            c = out
        layers.append(nn.Conv3d(c, num_classes, kernel_size=1))
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self[-1].weight, std=0.01)
        nn.init.zeros_(self[-1].bias)


class FinetuneNet(nn.Module):
    """``encoder`` (a zoo backbone, ``num_classes=0``) + ``head`` (decoder or linear classifier)."""

    def __init__(self, encoder: nn.Module, task: str, num_classes: int, decoder: str = "paper", drop_rate: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.decoder = decoder if task == "seg" else None
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        channels = encoder.num_features
        if task == "cls":
            self.head: nn.Module = nn.Linear(channels, num_classes)
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
        elif decoder == "paper":
            self.head = PaperDecoder(channels, num_classes)
        else:
            self.head = SegmentationHead(channels, num_classes)
            for m in self.head.modules():
                if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, task: int = 0) -> torch.Tensor:
        features = self.encoder.forward_features(x)
        if self.task == "cls":
            pooled = torch.flatten(F.adaptive_avg_pool3d(features, 1), 1)
            if self.drop_rate > 0:
                pooled = F.dropout(pooled, p=self.drop_rate, training=self.training)
            return self.head(pooled)
        logits = self.head(features)
        if logits.shape[2:] != x.shape[2:]:
            logits = F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
        return logits
