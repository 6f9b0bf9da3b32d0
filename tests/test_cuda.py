"""The GPU paths against the CPU: every forward, fp32 and bf16 autocast, channels_last_3d,
``optimize_for_inference``, a training step, ``extract_features``.

Marked ``cuda`` and skipped where torch sees no GPU. ``MED3D_TEST_DEVICE`` names the device under
test (default ``cuda``): ``.ci/run`` sets it to ``cpu``, so that CI runs these tests too, CPU against
CPU, and they cannot rot; the device check (``benchmarks/device_check.sh``) runs them on the GPU.

Every output is compared with the plain fp32 model on the CPU as max |device - cpu| / max |cpu|:

- fp32, TF32 off: ``FP32_TOL`` (cuDNN and oneDNN add in different orders);
- fp32 with PyTorch's default TF32 for cuDNN convolutions: ``TF32_TOL``;
- bf16 autocast: ``BF16_TOL`` (an 8-bit mantissa through up to 50 layers).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import med3d_hub
from med3d_hub.inference.optimize import optimize_for_inference

DEVICE = torch.device(os.environ.get("MED3D_TEST_DEVICE", "cuda"))
FP32_TOL = 1e-4
TF32_TOL = 1e-2
BF16_TOL = 5e-2
SHAPE = (2, 1, 12, 20, 14)  # odd sizes: padding, strides and the parameter-free shortcut at the edges

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="torch sees no CUDA GPU"),
]

# Both block types and both shortcuts: resnet10 (basic, conv shortcut), resnet18 (basic,
# parameter-free shortcut A), resnet50 (bottleneck, conv shortcut). The CPU dry run only keeps
# these tests working, so it takes the smallest model alone.
ON_GPU = DEVICE.type == "cuda"
ARCHS = ("resnet10", "resnet18", "resnet50") if ON_GPU else ("resnet10",)
TRAIN_ARCH = "resnet18" if ON_GPU else "resnet10"


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 on the GPU unless a test turns TF32 on itself."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel_diff(got, expected) -> float:
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def assert_close(got, expected, tol: float, what: str = "") -> None:
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), what
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, tol, f"{what}[{i}]")
        return
    diff = rel_diff(got, expected)
    assert diff <= tol, f"{what}: relative difference {diff:.2e} > {tol:.0e} on {DEVICE}"


def with_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that folding and eval-mode BN have work to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


def make(arch: str, **kwargs) -> nn.Module:
    """A CPU model in eval mode, built once per arguments (callers copy it before they change it)."""
    key = (arch, tuple(sorted(kwargs.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = with_bn_statistics(med3d_hub.create_model(arch, **kwargs))
    return _MODELS[key]


_MODELS: dict = {}


def volume(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def on_device(model: nn.Module, x: torch.Tensor, channels_last: bool):
    model = copy.deepcopy(model).to(DEVICE)
    x = x.to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return model, x


# Each forward path of the zoo: (model kwargs, the call).
PATHS = {
    "classifier": ({"num_classes": 3}, lambda m, x: m(x)),
    "embedding": ({"num_classes": 0}, lambda m, x: m(x)),
    "forward_features": ({"num_classes": 0}, lambda m, x: m.forward_features(x)),
    "forward_stages": ({"num_classes": 0}, lambda m, x: m.forward_stages(x)),
    "pre_logits": ({"num_classes": 3}, lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True)),
    "features_only": ({"features_only": True, "out_indices": (0, 2, 4)}, lambda m, x: m(x)),
    "segmentation": ({"seg_classes": 3, "seg_upsample": True}, lambda m, x: m(x)),
    "strided": ({"num_classes": 0, "dilated": False}, lambda m, x: m.forward_features(x)),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_forward_path_matches_the_cpu_in_fp32(arch, layout):
    x = volume()
    for path, (kwargs, call) in PATHS.items():
        model = make(arch, **kwargs)
        with torch.inference_mode():
            expected = call(model, x)
            net, xd = on_device(model, x, layout == "channels_last_3d")
            got = call(net, xd)
        assert_close(got, expected, FP32_TOL, f"{arch} {path} {layout}")


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_matches_the_cpu_in_fp32(arch):
    x = volume(1)
    for path in ("classifier", "forward_stages", "segmentation"):
        kwargs, call = PATHS[path]
        model = make(arch, **kwargs)
        with torch.inference_mode():
            expected = call(model, x)
            net, xd = on_device(model, x, channels_last=True)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                got = call(net, xd)
        first = got[0] if isinstance(got, list) else got
        assert first.dtype == torch.bfloat16, f"{path}: autocast did not run the convs in bf16"
        assert_close(got, expected, BF16_TOL, f"{arch} {path} bf16")


def test_default_tf32_stays_within_its_tolerance():
    """What users get by default on Ampere and later: cuDNN convolutions in TF32."""
    torch.backends.cudnn.allow_tf32 = True
    x = volume(2)
    model = make("resnet50", num_classes=0)
    with torch.inference_mode():
        expected = model.forward_features(x)
        net, xd = on_device(model, x, channels_last=True)
        assert_close(net.forward_features(xd), expected, TF32_TOL, "resnet50 TF32")


@pytest.mark.parametrize("arch", ARCHS)
def test_optimize_for_inference_on_the_device(arch):
    """Folded BatchNorm and channels_last_3d weights on the device; plain ops there, same outputs."""
    x = volume(3)
    for path in ("classifier", "forward_stages", "features_only", "segmentation"):
        kwargs, call = PATHS[path]
        model = make(arch, **kwargs)
        with torch.inference_mode():
            expected = call(model, x)
        for order in ("optimize, then move", "move, then optimize"):
            if order == "optimize, then move":
                fast = optimize_for_inference(model).to(DEVICE)
            else:
                fast = optimize_for_inference(copy.deepcopy(model).to(DEVICE))
            convs = [m for m in fast.modules() if isinstance(m, nn.Conv3d)]
            assert all(c.weight.device.type == DEVICE.type for c in convs)
            assert all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
            assert not any(isinstance(m, nn.BatchNorm3d) for m in fast.modules() if not _in_seg_head(fast, m))
            xd = x.to(DEVICE)
            with torch.inference_mode():
                assert_close(call(fast, xd), expected, FP32_TOL, f"{arch} {path} fast ({order})")
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                    assert_close(call(fast, xd), expected, BF16_TOL, f"{arch} {path} fast bf16 ({order})")
            with torch.no_grad():  # also outside inference mode (the fused CPU path takes other ops there)
                assert_close(call(fast, xd), expected, FP32_TOL, f"{arch} {path} fast no_grad ({order})")


def _in_seg_head(model: nn.Module, module: nn.Module) -> bool:
    """The segmentation head's first BatchNorm follows a transposed conv, which folding leaves alone."""
    head = getattr(model, "conv_seg", None)
    return head is not None and any(module is m for m in head.modules())


def test_optimize_for_inference_with_compile_on_the_device():
    if not ON_GPU:
        pytest.skip("torch.compile on the CPU: tests/test_inference.py")
    x = volume(4)
    model = make("resnet10", num_classes=0)
    with torch.inference_mode():
        expected = model.forward_features(x)
    fast = optimize_for_inference(copy.deepcopy(model).to(DEVICE), compile=True)
    with torch.inference_mode():
        assert_close(fast.forward_features(x.to(DEVICE)), expected, FP32_TOL, "resnet10 compiled")


def _cotrain_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, task: int, amp: bool):
    net.train()
    net.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(x, task)
    loss = nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    grads = {k: p.grad.detach().float().cpu() for k, p in net.named_parameters() if p.grad is not None}
    buffers = {k: b.detach().float().cpu() for k, b in net.named_buffers() if b.is_floating_point()}
    return float(loss.detach()), grads, buffers


@pytest.mark.parametrize("variant", ["fp32", "fp32 channels_last_3d", "fp32 grad_checkpointing", "bf16 channels_last_3d"])
def test_a_cotraining_step_matches_the_cpu(variant):
    """Loss, every gradient and the updated BatchNorm statistics of one step of the co-training network."""
    from med3d_hub.training.model import CoTrainNet

    torch.manual_seed(0)
    net = CoTrainNet(TRAIN_ARCH, ["a", "b"], [2, 3])
    x = volume(5, (2, 1, 16, 16, 16))
    y = torch.randint(0, 3, (2, 16, 16, 16), generator=torch.Generator().manual_seed(5))
    reference = copy.deepcopy(net)
    loss_cpu, grads_cpu, buffers_cpu = _cotrain_step(reference, x, y, 1, amp=False)
    device_net, xd = on_device(net, x, channels_last="channels_last" in variant)
    if "grad_checkpointing" in variant:
        device_net.encoder.set_grad_checkpointing(True)
    amp = variant.startswith("bf16")
    loss, grads, buffers = _cotrain_step(device_net, xd, y.to(DEVICE), 1, amp=amp)
    assert set(grads) == set(grads_cpu)
    tol = BF16_TOL if amp else 1e-3  # gradients sum over many voxels: looser than the forward
    assert abs(loss - loss_cpu) <= tol * abs(loss_cpu)
    for key, expected in grads_cpu.items():
        if expected.abs().max() == 0:  # the unused branch: zero gradients, on every device
            assert grads[key].abs().max() == 0, key
            continue
        if amp:  # bf16 gradients: same direction
            cosine = nn.functional.cosine_similarity(grads[key].flatten(), expected.flatten(), dim=0)
            assert cosine > 0.9, f"{key}: cosine {float(cosine):.4f}"
        else:
            assert_close(grads[key], expected, tol, f"grad {key} ({variant})")
    if "grad_checkpointing" in variant:
        return  # the recomputed forward updates the BatchNorm statistics a second time (documented)
    for key, expected in buffers_cpu.items():
        assert_close(buffers[key], expected, BF16_TOL if amp else FP32_TOL, f"buffer {key} ({variant})")


@pytest.mark.parametrize("task,decoder", [("seg", "paper"), ("seg", "conv_seg"), ("cls", None)])
def test_finetune_networks_match_the_cpu(task, decoder):
    from med3d_hub.training.finetune_model import FinetuneNet

    torch.manual_seed(0)
    net = with_bn_statistics(FinetuneNet(med3d_hub.create_model("resnet10", num_classes=0), task, 3, decoder or "paper"))
    x = volume(6, (2, 1, 16, 24, 24))
    with torch.inference_mode():
        expected = net(x)
        # On the CPU, transposed 3D convs in channels_last or emulated bf16 take minutes: GPU only.
        for channels_last in (False, True) if ON_GPU else (False,):
            device_net, xd = on_device(net, x, channels_last)
            assert_close(device_net(xd), expected, FP32_TOL, f"{task} {decoder} channels_last={channels_last}")
            if ON_GPU:
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                    assert_close(device_net(xd), expected, BF16_TOL, f"{task} {decoder} bf16")


def test_extract_features_on_the_device_matches_the_cpu():
    from med3d_hub.inference.features import extract_features

    model = make("resnet10", num_classes=0)
    arrays = [np.asarray(volume(7 + i, SHAPE[2:])) * 100 + 300 for i in range(3)]
    preprocess = {"spacing": None, "intensity": {"method": "percentile_zscore"}, "crop_foreground": False, "size": [16, 24, 24]}
    expected = extract_features(model, arrays, preprocess=preprocess, device="cpu", fast=False)
    for fast, workers in ((False, 0), (True, 2)):  # workers: reading processes, pinned memory on CUDA
        got = extract_features(model, arrays, preprocess=preprocess, device=DEVICE, fast=fast, batch_size=2,
                               workers=workers)
        assert_close(torch.from_numpy(got), torch.from_numpy(expected), FP32_TOL, f"extract_features fast={fast}")
    got = extract_features(model, arrays, preprocess=preprocess, device=DEVICE, amp="bf16", force_amp=True, batch_size=2)
    assert_close(torch.from_numpy(got), torch.from_numpy(expected), BF16_TOL, "extract_features bf16")
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is left where it was
