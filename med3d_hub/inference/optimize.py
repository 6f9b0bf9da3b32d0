"""The fast inference path: the same outputs within float rounding, less work per volume.

``optimize_for_inference(model)`` returns an eval-only copy of a zoo model with:

- BatchNorm folded into the conv before it (eval-mode BN is an affine map per channel);
- frozen weights in the channels_last_3d layout, which oneDNN and cuDNN run faster for 3D convs;
- on the CPU, each conv (+ ReLU) (+ residual addition) of a block, and the stem's conv + ReLU, run
  as one oneDNN primitive on weights reordered once into oneDNN's blocked layout, instead of
  reordered again at every call (the fused path below);
- optionally ``torch.compile`` with Inductor's ``freezing``, falling back to eager where it fails.

The fused path calls oneDNN through PyTorch's ``torch.ops.mkldnn._convolution_pointwise`` (the op
Inductor itself emits for CPU convs), which is not a public API. ``optimize_for_inference`` checks
once per process that it exists and computes what ``conv3d`` computes; where it does not (another
PyTorch release, a build without oneDNN) the copy keeps the folded, channels_last model and logs
why. Per call, a block takes the plain PyTorch ops wherever the fused ones do not apply: CUDA,
float64, inputs that need gradients, ``torch.compile`` or tracing, or
``torch.backends.mkldnn.flags(enabled=False)``. The default model never runs these ops.

bf16 on a CPU with AMX or AVX512-BF16 is opt-in through autocast (``extract_features(amp="bf16")``,
``med3d features --amp bf16``): the fused primitives follow the autocast dtype. It changes the
outputs by about 1e-2 relative, so it is never the default.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..networks.resnet import BasicBlock, Bottleneck

log = logging.getLogger(__name__)

__all__ = ["fold_batchnorm", "optimize_for_inference"]

# -- folding ------------------------------------------------------------------------------------------

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


# -- the fused oneDNN path ------------------------------------------------------------------------------


def _autocast_dtype() -> torch.dtype | None:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def _fused_applies(x, conv: nn.Conv3d) -> bool:
    """Whether this call can run ``conv`` (a folded, frozen fp32 CPU conv) as a fused oneDNN primitive."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False  # let the compiler or the tracer see the plain ops
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return False  # the fused primitives have no backward
    dtype = _autocast_dtype() or x.dtype
    return (
        (dtype == torch.float32 or (dtype == torch.bfloat16 and fused_bf16_available()))
        and conv.weight.dtype == torch.float32
        and conv.weight.device.type == "cpu"
        and torch.backends.mkldnn.enabled
    )


class _PackedWeights:
    """A conv's weights reordered into oneDNN's blocked layout, per dtype, rebuilt when the weights change.

    The copy is the size of the weights. It is never pickled or deep-copied (a copy starts empty).
    """

    def __init__(self):
        self.entries: dict = {}

    def get(self, conv: nn.Conv3d, dtype: torch.dtype, geometry: tuple, input_shape) -> tuple:
        """The packed weight and the bias in ``dtype``; ``geometry`` is (padding, stride, dilation)."""
        key = tuple(None if t is None else (t.data_ptr(), None if t.is_inference() else t._version)
                    for t in (conv.weight, conv.bias)) + (geometry,)
        cached = self.entries.get((dtype, geometry))
        if cached is None or cached[0] != key:
            padding, stride, dilation = geometry
            with torch.no_grad():
                dense = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last_3d)
                packed = torch._C._nn.mkldnn_reorder_conv3d_weight(
                    dense.to_mkldnn(), list(padding), list(stride), list(dilation), conv.groups, list(input_shape)
                )
                bias = None if conv.bias is None else conv.bias.detach().to(dtype).contiguous()
            cached = self.entries[(dtype, geometry)] = (key, packed, bias)
        return cached[1], cached[2]

    def __getstate__(self):
        return {"entries": {}}

    def __deepcopy__(self, memo):
        return _PackedWeights()


def _packed(conv: nn.Conv3d) -> _PackedWeights:
    cache = conv.__dict__.get("_packed_weights")
    if cache is None:
        cache = conv.__dict__["_packed_weights"] = _PackedWeights()
    return cache


def _fused_conv(conv: nn.Conv3d, x: torch.Tensor, *, relu: bool, residual: torch.Tensor | None = None):
    """``relu(conv(x) + residual)`` as one oneDNN primitive, in the autocast dtype if CPU autocast is on."""
    dtype = _autocast_dtype() or x.dtype
    if dtype == torch.bfloat16 and conv.in_channels < 4:
        dtype = torch.float32  # AMX has nothing to work with on 1-3 input channels: fp32 is faster (the stem)
    x = x.to(dtype)
    if dtype == torch.bfloat16 and _sub_grids_apply(conv):
        return _dilated_on_sub_grids(conv, x, relu, residual)
    geometry = (tuple(conv.padding), tuple(conv.stride), tuple(conv.dilation))
    packed, bias = _packed(conv).get(conv, dtype, geometry, x.shape)
    padding, stride, dilation = (list(g) for g in geometry)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, padding, stride, dilation, conv.groups, "relu" if relu else "none", [], ""
        )
    residual = residual.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, packed, bias, padding, stride, dilation, conv.groups, "add", None, "relu" if relu else None, [], ""
    )


def _sub_grids_apply(conv: nn.Conv3d) -> bool:
    """A 3x3x3 'same' conv with dilation >= 3: oneDNN's bf16 kernels for it are 4-25x slower than fp32."""
    d = conv.dilation[0]
    return (d >= 3 and tuple(conv.dilation) == (d, d, d) and tuple(conv.padding) == (d, d, d)
            and tuple(conv.kernel_size) == (3, 3, 3) and tuple(conv.stride) == (1, 1, 1) and conv.groups == 1)


def _dilated_on_sub_grids(conv: nn.Conv3d, x: torch.Tensor, relu: bool, residual: torch.Tensor | None):
    """A conv with dilation d as a conv with dilation d / f on the f^3 interleaved sub-grids of the input.

    Output voxel ``f*q + r`` only sees input voxels ``f*q' + r`` (f divides d): sub-grid ``r`` alone,
    through the same kernel with dilation d / f. Same arithmetic, so the same result; used for
    bf16, where oneDNN's kernels for large dilations are slow and dilation 2 is fast (f = d / 2 for
    even d, else f = d). The input is zero-padded at the end to a multiple of f, the output cropped.
    """
    d = conv.dilation[0]
    f = d // 2 if d % 2 == 0 else d
    rest = d // f
    n, c, depth, height, width = x.shape
    pad = [(-size) % f for size in (depth, height, width)]
    if any(pad):
        x = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    D, H, W = ((size + p) // f for size, p in zip((depth, height, width), pad))
    grids = x.permute(0, 2, 3, 4, 1).reshape(n, D, f, H, f, W, f, c).permute(0, 2, 4, 6, 1, 3, 5, 7)
    grids = grids.reshape(n * f**3, D, H, W, c).permute(0, 4, 1, 2, 3)  # channels_last_3d
    geometry = ((rest,) * 3, (1, 1, 1), (rest,) * 3)
    packed, bias = _packed(conv).get(conv, x.dtype, geometry, grids.shape)
    y = torch.ops.mkldnn._convolution_pointwise(
        grids, packed, bias, [rest] * 3, [1, 1, 1], [rest] * 3, 1, "none", [], ""
    )
    out = y.shape[1]
    y = y.permute(0, 2, 3, 4, 1).reshape(n, f, f, f, D, H, W, out).permute(0, 4, 1, 5, 2, 6, 3, 7)
    y = y.reshape(n, D * f, H * f, W * f, out)[:, :depth, :height, :width].permute(0, 4, 1, 2, 3)
    y = y.contiguous(memory_format=torch.channels_last_3d)
    if residual is not None:
        y = y.add_(residual.to(y.dtype))
    return y.relu_() if relu else y


class FusedConvReLU3d(nn.Conv3d):
    """A folded stem conv followed by its ReLU (the model's own ReLU becomes an Identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused_applies(x, self):
            return _fused_conv(self, x, relu=True)
        return torch.relu(super().forward(x))


class _FusedBlock:
    """A folded residual block: 2 or 3 fused primitives (+1 for a conv shortcut), else its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not _fused_applies(x, self.conv1):
            return super().forward(x)
        down = self.downsample
        if down is None:
            shortcut = x
        elif isinstance(down, nn.Sequential):  # conv + folded BatchNorm (an Identity)
            shortcut = _fused_conv(down[0], x, relu=False)
        else:  # shortcut A: subsample and zero-pad, no weights
            shortcut = down(x)
        convs = [self.conv1, self.conv2] + ([self.conv3] if hasattr(self, "conv3") else [])
        out = x
        for conv in convs[:-1]:
            out = _fused_conv(conv, out, relu=True)
        return _fused_conv(convs[-1], out, relu=True, residual=shortcut)


class FusedBasicBlock(_FusedBlock, BasicBlock):
    pass


class FusedBottleneck(_FusedBlock, Bottleneck):
    pass


_FUSED_BLOCKS = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def _folded(module: nn.Module) -> bool:
    """No BatchNorm left, and every conv a plain Conv3d (what the fused forwards assume)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) and all(
        type(m) in (nn.Conv3d, FusedConvReLU3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        for m in module.modules() if isinstance(m, nn.Conv3d)
    )


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else ""


@functools.cache
def fused_path_available() -> bool:
    """Whether the fused oneDNN ops exist in this PyTorch and compute what ``conv3d`` computes (checked once)."""
    try:
        generator = torch.Generator().manual_seed(0)
        conv = nn.Conv3d(8, 8, 3, padding=2, dilation=2).eval().requires_grad_(False)
        x = torch.randn(1, 8, 6, 7, 5, generator=generator)
        residual = torch.randn(1, 8, 6, 7, 5, generator=generator)
        with torch.no_grad():
            expected = torch.relu(conv(x) + residual)
            got = _fused_conv(conv, x.contiguous(memory_format=torch.channels_last_3d), relu=True, residual=residual)
        if torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            return True
        reason = f"it differs from conv3d by {float((got - expected).abs().max()):.2g}"
    except Exception as err:  # a PyTorch without oneDNN, or one that changed the op
        reason = f"{type(err).__name__}: {_first_line(err)}"
    log.warning("the fused oneDNN conv path is unavailable (%s); optimize_for_inference keeps the plain convs", reason)
    return False


@functools.cache
def fused_bf16_available() -> bool:
    """Whether oneDNN runs the fused ops in bf16 on this CPU (it refuses CPUs without AVX-512 or AVX-NE-CONVERT).

    Where it does not, bf16 autocast around the fast model takes the plain ops, which autocast
    then runs in bf16 its own (slow, emulated) way.
    """
    try:
        generator = torch.Generator().manual_seed(0)
        conv = nn.Conv3d(8, 8, 3, padding=2, dilation=2).eval().requires_grad_(False)
        x = torch.randn(1, 8, 6, 7, 5, generator=generator).contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            expected = torch.relu(conv(x))
            got = _fused_conv(conv, x.to(torch.bfloat16), relu=True).float()
        return bool((got - expected).abs().max() <= 5e-2 * expected.abs().max())
    except Exception as err:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        log.info("the fused oneDNN conv path has no bf16 on this CPU (%s); bf16 autocast takes the plain convs",
                 _first_line(err))
        return False


def _fuse(model: nn.Module) -> None:
    """Swap folded blocks and the folded stem for their fused subclasses (same parameters, same names)."""
    for module in model.modules():
        fused = _FUSED_BLOCKS.get(type(module))
        if fused is not None and _folded(module):
            module.__class__ = fused
    conv = getattr(model, "conv1", None)
    stem_folded = isinstance(getattr(model, "bn1", None), nn.Identity) and isinstance(getattr(model, "relu", None), nn.ReLU)
    if type(conv) is nn.Conv3d and stem_folded and _folded(conv):
        conv.__class__ = FusedConvReLU3d
        model.relu = nn.Identity()


# -- torch.compile with a fallback ----------------------------------------------------------------------------


class _CompiledWithFallback:
    """Call the compiled function; if that fails where the eager one works, warn once and stay eager.

    ``torch.compile`` fails lazily, at the first call of each new input shape. An error that the
    eager function raises too (a wrong input) is the caller's and is raised as usual.
    """

    def __init__(self, eager: Callable, compiled: Callable):
        self.eager = eager
        self.compiled: Callable | None = compiled

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:
                out = self.eager(*args, **kwargs)  # raises if the input itself is wrong
                log.warning("torch.compile failed (%s: %s); using the eager fast path", type(err).__name__, _first_line(err))
                self.compiled = None
                return out
        return self.eager(*args, **kwargs)


def _compile(model: nn.Module) -> nn.Module:
    """Compile the method every forward of the model goes through (``stage_outputs`` for the zoo's)."""
    name = "stage_outputs" if callable(getattr(model, "stage_outputs", None)) else "forward"
    eager = getattr(model, name)
    try:
        compiled = torch.compile(eager, dynamic=False, options={"freezing": True})
    except Exception as err:  # e.g. a Python version torch.compile does not support
        log.warning("torch.compile is unavailable (%s); using the eager fast path", err)
        return model
    setattr(model, name, _CompiledWithFallback(eager, compiled))  # an instance attribute: the model's methods use it
    return model


# -- the one call ---------------------------------------------------------------------------------------------


def optimize_for_inference(model: nn.Module, *, compile: bool = False, inplace: bool = False) -> nn.Module:
    """An eval-only copy of ``model`` that computes the same outputs, faster, in any grad mode.

    Works on any zoo model (classifier, embedding, segmentation head, ``features_only``) and keeps
    its methods (``forward_features``, ``forward_head``, ``forward_stages``, ``stage_outputs``,
    ``feature_info``) and its state_dict keys less the BatchNorms. BatchNorm is folded once, the weights are frozen and
    channels_last_3d, the blocks and the stem run fused oneDNN primitives on the CPU (module
    docstring), and ``compile=True`` adds ``torch.compile`` with frozen weights, falling back to
    eager with a warning where compilation fails. Outputs equal the plain eval model's within float
    rounding (tested to 1e-4 relative). The copy is for inference only: it has no BatchNorm left
    to train.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    fold_batchnorm(model)
    model.to(memory_format=torch.channels_last_3d)
    if fused_path_available():
        _fuse(model)
    return _compile(model) if compile else model
