"""The fine-tuning network: a Med3D encoder from the zoo and a new head.

- Segmentation, ``decoder: paper``: the paper's decoder for its lung segmentation transfer: three
  groups of [transposed conv (kernel 2, stride 2) + BN + ReLU, 3x3x3 conv + BN + ReLU] take the
  layer4 features (output stride 8) back to the input's size, then a 1x1x1 conv gives the classes.
- Segmentation, ``decoder: conv_seg``: upstream MedicalNet's head (the zoo's ``SegmentationHead``,
  output at 1/4 of the input), upsampled trilinearly to the input's size.
- Classification: global average pooling of layer4, optional dropout, one linear layer.

``FinetuneNet.forward(x, task=0)`` follows the training engine's convention (the task index is
ignored: there is one task). ``to_zoo_model`` turns the trained network into a zoo
``Med3DResNet`` (``fc`` or ``conv_seg`` head) for ``save_pretrained`` / ``med3d publish``; the
paper's decoder is not a zoo head, so that model holds the fine-tuned encoder only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..networks.heads import SegmentationHead
from ..networks.registry import split_name
from ..weights.factory import create_model, resolve_pretrained
from ..weights.hub_model import build_model
from .finetune_config import FinetuneConfig

__all__ = ["FinetuneNet", "PaperDecoder", "build_finetune_net", "to_zoo_model"]

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


def build_finetune_net(cfg: FinetuneConfig, num_classes: int) -> FinetuneNet:
    """The encoder with ``cfg.pretrained`` loaded strictly, and a freshly initialised head."""
    arch, tag = split_name(cfg.model)
    if tag is not None:
        raise UsageError(f"model {cfg.model!r}: give the architecture as model and the weights as pretrained ({tag!r})")
    name, pretrained = resolve_pretrained(arch, cfg.pretrained)
    encoder = create_model(name, pretrained=pretrained, num_classes=0)
    return FinetuneNet(encoder, cfg.task, num_classes, cfg.decoder, cfg.drop_rate)


def to_zoo_model(net: FinetuneNet) -> nn.Module:
    """The trained network as a zoo ``Med3DResNet`` (the paper's decoder is dropped: encoder only)."""
    enc = net.encoder
    arch_kwargs = {"shortcut": enc.shortcut, "in_chans": enc.in_chans, "dilated": enc.dilated}
    from ..weights.model_files import architecture_of

    arch = architecture_of(enc.block, enc.layers)
    state = {k: v for k, v in enc.state_dict().items()}
    if net.task == "cls":
        model = build_model(arch, num_classes=net.num_classes, drop_rate=net.drop_rate, **arch_kwargs)
        state.update({f"fc.{k}": v for k, v in net.head.state_dict().items()})
    elif net.decoder == "conv_seg":
        model = build_model(arch, seg_classes=net.num_classes, seg_upsample=True, **arch_kwargs)
        state.update({f"conv_seg.{k}": v for k, v in net.head.state_dict().items()})
    else:
        model = build_model(arch, num_classes=0, **arch_kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()
