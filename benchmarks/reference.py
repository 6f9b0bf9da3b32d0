"""The baseline forward: a plain Med3D backbone written the way upstream MedicalNet writes it.

Kept apart from the package on purpose, so that the benchmark compares the package against what a
user runs today: one ``nn.Module`` per layer, BatchNorm after every conv, eager fp32, contiguous
(NCDHW) tensors, the parameter-free shortcut A as an average pool plus a concatenation of zeros.
Parameter names are MedicalNet's (without ``module.``), so the released files, and the package's
models' state dicts, load into it strictly. The forward returns the layer4 feature map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {
    "resnet10": ("basic", (1, 1, 1, 1), "B"),
    "resnet18": ("basic", (2, 2, 2, 2), "A"),
    "resnet34": ("basic", (3, 4, 6, 3), "A"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "B"),
    "resnet101": ("bottleneck", (3, 4, 23, 3), "B"),
    "resnet152": ("bottleneck", (3, 8, 36, 3), "B"),
    "resnet200": ("bottleneck", (3, 24, 36, 3), "B"),
}


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _ZeroPadShortcut(nn.Module):
    """Shortcut A as upstream computes it: kernel-1 average pool by the stride, then zero channels."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x):
        out = F.avg_pool3d(x, kernel_size=1, stride=self.stride)
        zeros = torch.zeros(out.size(0), self.planes - out.size(1), *out.shape[2:], dtype=out.dtype, device=out.device)
        return torch.cat([out, zeros], dim=1)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class ReferenceBackbone(nn.Module):
    """Stem, maxpool, layer1-4 with strides 1, 2, 1, 1 and dilations 1, 1, 2, 4."""

    def __init__(self, arch: str):
        super().__init__()
        kind, layers, shortcut = DEPTHS[arch]
        block = _Basic if kind == "basic" else _Bottleneck
        self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.inplanes = 64
        self.layer1 = self._stage(block, 64, layers[0], shortcut)
        self.layer2 = self._stage(block, 128, layers[1], shortcut, stride=2)
        self.layer3 = self._stage(block, 256, layers[2], shortcut, dilation=2)
        self.layer4 = self._stage(block, 512, layers[3], shortcut, dilation=4)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm3d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _stage(self, block, planes, blocks, shortcut, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if shortcut == "A":
                downsample = _ZeroPadShortcut(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * block.expansion),
                )
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def count_macs(arch: str, input_shape) -> dict:
    """Multiply-accumulates of the backbone's convs for one forward of ``input_shape``.

    ``real``: only the kernel taps that land inside the input (oneDNN skips the taps that fall in
    the zero padding, and with dilation 4 on a small map that is a large share); ``nominal``: every
    tap, as the usual formula counts them. Runs on the meta device: no memory, no arithmetic.
    """
    totals = {"real": 0, "nominal": 0}

    def hook(module, inputs, output):
        x = inputs[0]
        per_tap = x.shape[0] * module.out_channels * (x.shape[1] // module.groups)
        real, nominal = per_tap, per_tap
        for size, out, k, s, p, d in zip(x.shape[2:], output.shape[2:], module.kernel_size, module.stride,
                                         module.padding, module.dilation):
            real *= sum(1 for o in range(out) for j in range(k) if 0 <= o * s - p + j * d < size)
            nominal *= out * k
        totals["real"] += real
        totals["nominal"] += nominal

    from med3d_hub.weights.loader import _SkipRandomInitOnMeta  # random init on meta tensors would import torch._dynamo

    with torch.device("meta"), _SkipRandomInitOnMeta():
        model = ReferenceBackbone(arch).eval()
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                m.register_forward_hook(hook)
        with torch.no_grad():
            model(torch.empty(tuple(input_shape)))
    return totals
