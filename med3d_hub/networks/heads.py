"""Heads that sit on the Med3D backbone."""

from torch import nn


# The submodule of `SegmentationHead` that gives the class logits: `conv_seg.6` is the classifier.
LOGITS_INDEX = 6


class SegmentationHead(nn.Sequential):
    """MedicalNet's `conv_seg`: a 2x transposed conv, a 3x3x3 conv, then a 1x1x1 conv to classes.

    On the output-stride-8 backbone it yields logits at 1/4 of the input size. The submodule
    indices (0, 1, 3, 4, 6) match upstream's keys, so its checkpoints load unchanged.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 32):
        super().__init__(
            nn.ConvTranspose3d(in_channels, hidden, kernel_size=2, stride=2),
            nn.BatchNorm3d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, num_classes, kernel_size=1, bias=False),
        )
