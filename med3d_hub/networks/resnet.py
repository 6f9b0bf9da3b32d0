"""The Med3D 3D ResNet (Chen, Ma, Zheng 2019), faithful to the released MedicalNet weights.

What makes it Med3D rather than a plain 3D ResNet: layer3 and layer4 keep stride 1 and dilate their
3x3x3 convs by 2 and 4, so the backbone's output stride is 8, and depths 18/34 use the
parameter-free shortcut "A". Parameter names are exactly MedicalNet's (without `module.`), so the
released files load with `strict=True`; heads only add their own keys.

This module builds networks, and only that: no files, no Hub. The classes users hold add
huggingface_hub's `PyTorchModelHubMixin` on top (`med3d_hub.weights.hub_model`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from .heads import LOGITS_INDEX, SegmentationHead

# Block type, blocks per stage and the shortcut the released weights use, per depth.
ARCHITECTURES: dict[str, dict] = {
    "resnet10": {"block": "basic", "layers": (1, 1, 1, 1), "shortcut": "B"},
    "resnet18": {"block": "basic", "layers": (2, 2, 2, 2), "shortcut": "A"},
    "resnet34": {"block": "basic", "layers": (3, 4, 6, 3), "shortcut": "A"},
    "resnet50": {"block": "bottleneck", "layers": (3, 4, 6, 3), "shortcut": "B"},
    "resnet101": {"block": "bottleneck", "layers": (3, 4, 23, 3), "shortcut": "B"},
    "resnet152": {"block": "bottleneck", "layers": (3, 8, 36, 3), "shortcut": "B"},
    "resnet200": {"block": "bottleneck", "layers": (3, 24, 36, 3), "shortcut": "B"},
}

STAGE_PLANES = (64, 128, 256, 512)
# (stride, dilation) of layer1..layer4: Med3D's dilated layout and the classic strided one.
DILATED_LAYOUT = ((1, 1), (2, 1), (1, 2), (1, 4))
STRIDED_LAYOUT = ((1, 1), (2, 1), (2, 1), (2, 1))

DEFAULT_NUM_CLASSES = 2
# D, H, W of MedicalNet's training crops (the defaults of its settings): the input size timm reports
# for weights whose preprocessing fixes no size.
MEDICALNET_INPUT_SIZE = (56, 448, 448)


def timm_data_cfg(
    in_chans: int, size: Sequence[int] | None = None, *, num_classes: int = 0, seg_classes: int | None = None
) -> dict:
    """timm's keys of ``pretrained_cfg``, in 3D: what ``timm.data.resolve_model_data_config`` reads.

    ``input_size`` is (C, D, H, W): ``size`` (the weights' preprocessing size, D, H, W) or
    MedicalNet's training crop. ``mean``/``std`` are 0/1 per channel because the preprocessing
    z-scores each volume by its own intensities (``pretrained_cfg["preprocess"]``), not by
    dataset statistics: the network sees zero-mean, unit-variance input.
    """
    return {
        "input_size": [in_chans, *(size or MEDICALNET_INPUT_SIZE)],  # lists: pretrained_cfg is JSON-ready
        "mean": [0.0] * in_chans,
        "std": [1.0] * in_chans,
        "interpolation": "trilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": seg_classes if seg_classes is not None else num_classes,
        "first_conv": "conv1",
        "classifier": f"conv_seg.{LOGITS_INDEX}" if seg_classes is not None else "fc",
    }


def conv3x3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by the stride, zero-pad the channels.

    Same forward as MedicalNet's `downsample_basic_block`, minus its accidental `.data` detach,
    so gradients flow through the shortcut.
    """

    def __init__(self, out_planes: int, stride: int):
        super().__init__()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.out_planes - x.shape[1]))


def make_shortcut(kind: str, in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if kind == "A":
        return ShortcutA(out_planes, stride)
    return nn.Sequential(
        nn.Conv3d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm3d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, dilation=1, downsample=None, drop_path=None):
        super().__init__()
        self.conv1 = conv3x3x3(in_planes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample
        self.drop_path = drop_path or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.drop_path(out)
        out += shortcut  # in place, as upstream: no new map per block (BatchNorm's backward does not need its output)
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, dilation=1, downsample=None, drop_path=None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.drop_path(out)
        out += shortcut  # in place, as upstream: no new map per block (BatchNorm's backward does not need its output)
        return self.relu(out)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def init_weights(module: nn.Module) -> None:
    """The zoo's random init (upstream's): Kaiming-normal convs, unit BatchNorm; for a model or a new head."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FeatureInfo(list):
    """One dict per returned feature map: `num_chs`, `reduction` (stride w.r.t. the input), `module`."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


def _drop_path_module(rate: float) -> nn.Module | None:
    if rate <= 0:
        return None
    from timm.layers import DropPath  # timm is only needed when stochastic depth is asked for

    return DropPath(rate)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"{name}={value!r} is not supported; expected one of {sorted(allowed)}")


def _check_arguments(block, layers, shortcut, in_chans, num_classes, seg_classes, drop_path_rate) -> int:
    """Refuse a network that cannot be built, naming the argument; returns the classifier's class count.

    A segmentation head replaces the classifier (0 classes); without either, DEFAULT_NUM_CLASSES.
    """
    _check_choice("block", block, BLOCKS)
    _check_choice("shortcut", shortcut, {"A", "B"})
    if not isinstance(in_chans, int) or in_chans < 1:
        raise UsageError(f"in_chans must be an integer >= 1 (input channels), got {in_chans!r}")
    if seg_classes is not None:
        if not isinstance(seg_classes, int) or seg_classes < 1:
            raise UsageError(f"seg_classes must be an integer >= 1, got {seg_classes!r}")
        if num_classes:
            raise UsageError("give either num_classes (classification) or seg_classes (segmentation), not both")
        num_classes = 0
    elif num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES
    if not isinstance(num_classes, int) or num_classes < 0:
        raise UsageError(f"num_classes must be an integer >= 0 (0 = no head), got {num_classes!r}")
    if len(layers) != 4 or any(n < 1 for n in layers):
        raise UsageError(f"layers must list 4 positive block counts, got {tuple(layers)!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise UsageError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    return num_classes


def _make_stage(block_cls, in_planes: int, planes: int, stride: int, dilation: int, shortcut: str,
                drop_rates: Sequence[float]) -> tuple[nn.Sequential, int]:
    """One stage: its first block changes stride and width (through the shortcut), the others keep them."""
    out_planes = planes * block_cls.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = make_shortcut(shortcut, in_planes, out_planes, stride)
    blocks = [
        block_cls(
            in_planes if i == 0 else out_planes,
            planes,
            stride=stride if i == 0 else 1,
            dilation=dilation,
            downsample=downsample if i == 0 else None,
            drop_path=_drop_path_module(rate),
        )
        for i, rate in enumerate(drop_rates)
    ]
    return nn.Sequential(*blocks), out_planes


class Med3DResNet(nn.Module):
    """A Med3D 3D ResNet with an optional classification or segmentation head.

    Args:
        block: "basic" (depths 10/18/34) or "bottleneck" (50 and deeper).
        layers: blocks per stage.
        shortcut: "A" (zero-pad, no parameters) or "B" (1x1x1 conv + BN).
        in_chans: input channels (1 for the released weights).
        num_classes: classes of the linear head on the pooled layer4 features (default
            DEFAULT_NUM_CLASSES = 2); 0 = no head, the forward then returns the pooled embedding.
        seg_classes: when set, MedicalNet's `conv_seg` segmentation head replaces the classifier.
        seg_upsample: upsample the segmentation logits (1/4 of the input) to the input size.
        dilated: Med3D's layout (output stride 8); False gives the classic strided layout (32).
        drop_rate: dropout before the linear head.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        shortcut: str = "B",
        in_chans: int = 1,
        num_classes: int | None = None,
        seg_classes: int | None = None,
        seg_upsample: bool = False,
        dilated: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        num_classes = _check_arguments(block, layers, shortcut, in_chans, num_classes, seg_classes, drop_path_rate)
        self.block = block
        self.layers = tuple(layers)
        self.shortcut = shortcut
        self.in_chans = in_chans
        self.dilated = dilated
        self.grad_checkpointing = False
        # Modules are made in MedicalNet's order (stem, stages, heads): the parameter names, and the
        # random numbers each one draws, come out the same as upstream's.
        self._make_stem(in_chans)
        self.num_features = self._make_stages(BLOCKS[block], self.layers, drop_path_rate)
        self.seg_upsample = seg_upsample
        self.seg_classes = seg_classes
        if seg_classes is not None:
            self.conv_seg = SegmentationHead(self.num_features, seg_classes)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self._set_classifier(num_classes)
        self._init_weights()
        self.pretrained_cfg = self.data_cfg()  # random weights; loaders replace it with the weights' provenance

    # -- construction -------------------------------------------------------------------------
    def _make_stem(self, in_chans: int) -> None:
        """The 7x7x7 stride-2 convolution and the max pool: output stride 4 before layer1."""
        self.conv1 = nn.Conv3d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)

    def _make_stages(self, block_cls: type[nn.Module], layers: tuple[int, ...], drop_path_rate: float) -> int:
        """layer1..layer4 in the dilated (or strided) layout, and ``feature_info``; returns the output channels."""
        layout = DILATED_LAYOUT if self.dilated else STRIDED_LAYOUT
        total_blocks = sum(layers)
        drop_rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        in_planes, reduction, first_block = 64, 4, 0
        self.feature_info = FeatureInfo([{"num_chs": 64, "reduction": 2, "module": "relu"}])
        for stage, (planes, blocks, (stride, dilation)) in enumerate(zip(STAGE_PLANES, layers, layout), 1):
            stage_rates = drop_rates[first_block:first_block + blocks]
            layer, in_planes = _make_stage(block_cls, in_planes, planes, stride, dilation, self.shortcut, stage_rates)
            setattr(self, f"layer{stage}", layer)
            first_block += blocks
            reduction *= stride
            self.feature_info.append({"num_chs": in_planes, "reduction": reduction, "module": f"layer{stage}"})
        return in_planes

    def _set_classifier(self, num_classes: int) -> None:
        """Classifier keys are `fc.weight`/`fc.bias`; with no classes there is no `fc` at all."""
        if "fc" in self._modules:
            del self.fc
        self.num_classes = num_classes
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes)
            nn.init.zeros_(self.fc.bias)
            nn.init.normal_(self.fc.weight, std=0.01)

    def _init_weights(self) -> None:
        init_weights(self)

    # -- timm-like surface ----------------------------------------------------------------------
    def data_cfg(self, size: Sequence[int] | None = None) -> dict:
        """timm's keys of ``pretrained_cfg`` for this model (see `timm_data_cfg`)."""
        return timm_data_cfg(self.in_chans, size, num_classes=self.num_classes, seg_classes=self.seg_classes)

    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise learning-rate decay: the stem, then each stage (or block)."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        return set()

    def get_classifier(self) -> nn.Module:
        return self.fc if self.num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the linear head with a freshly initialised one (0 removes it).

        ``global_pool`` is timm's argument; the pooling here is always the average ("avg").
        """
        if not isinstance(num_classes, int) or num_classes < 0:
            raise UsageError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if global_pool not in (None, "avg"):
            raise UsageError(f"global_pool={global_pool!r} is not supported: Med3D ResNets pool by the average ('avg')")
        device = self.conv1.weight.device
        self._set_classifier(num_classes)
        if num_classes > 0:
            self.fc.to(device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations.

        Trades compute for memory on large volumes. BatchNorm running statistics in train mode are
        updated again during the recomputation, as with any activation checkpointing.
        """
        self.grad_checkpointing = enable

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise UsageError(
                f"expected a 5-D input N x C x D x H x W, got shape {tuple(x.shape)}; "
                "add the batch and channel axes, e.g. x[None, None] for a single D x H x W volume"
            )
        if x.shape[1] != self.in_chans:
            raise UsageError(
                f"expected {self.in_chans} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)}); "
                f"build the model with in_chans={x.shape[1]} to take this input"
            )

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_stages(self, x: torch.Tensor, last: int = 4) -> list[torch.Tensor]:
        """Stem activation (before the maxpool), then the outputs of layer1..layer`last`."""
        return self.stage_outputs(x, tuple(range(last + 1)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The layer4 feature map (output stride 8 in the Med3D layout)."""
        return self.stage_outputs(x, (4,))[0]

    def stage_outputs(self, x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        """The maps at ``indices`` (0 = stem, 1-4 = layer1..4), in that order; the others are freed as it goes.

        Every forward runs through here (``optimize_for_inference(compile=True)`` compiles it).
        Stages after the last requested map are not run.
        """
        self._check_input(x)
        x = self.relu(self.bn1(self.conv1(x)))
        kept = {0: x} if 0 in indices else {}
        if max(indices) > 0:
            x = self.maxpool(x)
            for stage in range(1, max(indices) + 1):
                x = self._run_stage(getattr(self, f"layer{stage}"), x)
                if stage in indices:
                    kept[stage] = x
        return [kept[i] for i in indices]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCDHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate-features call: maps 0 (stem) to 4 (layer4), as ``feature_info`` lists them.

        ``indices``: the last n maps (an int) or their positions (negative counts from the end);
        None takes all five. Returns the maps, or (the layer4 map, the maps) without ``intermediates_only``.
        """
        if output_fmt not in ("NCDHW", "NCHW"):
            raise UsageError(f"output_fmt={output_fmt!r} is not supported: the maps are N x C x D x H x W")
        count = 5
        if indices is None:
            chosen = list(range(count))
        elif isinstance(indices, int):
            chosen = list(range(count - indices, count))
        else:
            chosen = [i % count if -count <= i < count else i for i in indices]
        if any(not 0 <= i < count for i in chosen):
            raise UsageError(f"indices {indices!r} are out of range: there are {count} maps (0 = stem, 1-4 = layer1-4)")
        wanted = tuple(sorted(set(chosen)))
        last = max(wanted) if intermediates_only or stop_early else 4
        maps = dict(zip(sorted(set(wanted) | {last}), self.stage_outputs(x, tuple(sorted(set(wanted) | {last})))))
        intermediates = [maps[i] for i in chosen]
        return intermediates if intermediates_only else (maps[last], intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool + linear head; `pre_logits=True` returns the pooled embedding."""
        x = torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)
        if pre_logits or self.num_classes == 0:
            return x
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        if self.seg_classes is not None:
            logits = self.conv_seg(features)
            if self.seg_upsample:
                logits = F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
            return logits
        return self.forward_head(features)


class Med3DResNetFeatures(Med3DResNet):
    """A Med3D backbone returning a list of feature maps (`features_only=True`).

    `out_indices`: 0 = stem activation before the maxpool, 1-4 = layer1..layer4. It carries no
    head and keeps every stage (stages after the last requested map are simply not run), so its
    state_dict is exactly the backbone's and released weights load into it strictly.
    """

    def __init__(self, *args, out_indices: Sequence[int] = (1, 2, 3, 4), **kwargs):
        kwargs.update(num_classes=0, seg_classes=None)
        super().__init__(*args, **kwargs)
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(5) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise UsageError(f"out_indices must be distinct values in 0..4 (0 = stem, 1-4 = layer1-4), got {out_indices!r}")
        self.out_indices = out_indices
        self.feature_info = FeatureInfo(self.feature_info[i] for i in out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stage_outputs(x, self.out_indices)
