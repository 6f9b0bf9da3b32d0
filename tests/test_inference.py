"""Fast inference: ``optimize_for_inference`` equals the plain eval model within 1e-4 relative.

The plain eval model is the model's own forward with the PyTorch ops (what runs by default); the
fast paths are ``optimize_for_inference`` with its fused oneDNN primitives, the same with
``torch.compile``, and bf16 autocast (opt-in, looser).
"""

from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch
from torch import nn

import med3d_hub
from med3d_hub.inference import optimize as inference
from med3d_hub.inference.optimize import optimize_for_inference

RTOL = 1e-4
needs_fused = pytest.mark.skipif(not inference.fused_path_available(), reason="PyTorch without the fused oneDNN ops")


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so that folding has something to get wrong."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def _model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_batchnorm(med3d_hub.create_model(name, **kwargs)).eval()


def _plain(fn, x):
    with torch.no_grad():
        return fn(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _assert_close(out, ref, rtol=RTOL):
    if isinstance(ref, (list, tuple)):
        assert len(out) == len(ref)
        for o, r in zip(out, ref):
            _assert_close(o, r, rtol)
        return
    assert out.shape == ref.shape
    assert _rel(out, ref) <= rtol, _rel(out, ref)


def _ops(fn, x) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(x)
    return {e.key for e in prof.key_averages()}


MODELS = [
    ("resnet10", {}),  # basic blocks, shortcut B
    ("resnet18", {"num_classes": 5}),  # shortcut A (zero-padded channels), a classifier
    ("resnet50", {"num_classes": 0}),  # bottlenecks, pooled embedding
    ("resnet10", {"seg_classes": 3, "seg_upsample": True}),  # segmentation head
    ("resnet10", {"in_chans": 2, "num_classes": 0}),
    ("resnet10", {"dilated": False, "num_classes": 0}),  # the strided layout
]


@pytest.mark.parametrize("name,kwargs", MODELS, ids=[f"{n}-{'-'.join(map(str, k.values())) or 'default'}" for n, k in MODELS])
def test_the_fast_path_equals_the_plain_model(name, kwargs):
    model = _model(name, **kwargs)
    fast = optimize_for_inference(model)
    chans = kwargs.get("in_chans", 1)
    for shape in [(1, chans, 16, 24, 20), (2, chans, 8, 16, 16)]:
        x = torch.randn(shape)
        ref, ref_stages = _plain(model, x), _plain(model.forward_stages, x)
        with torch.inference_mode():
            _assert_close(fast(x), ref)
            _assert_close(fast.forward_stages(x), ref_stages)
        with torch.no_grad():
            _assert_close(fast.forward_features(x), ref_stages[-1])
        _assert_close(fast(x), ref)  # frozen weights: the fused path also runs with autograd on


@needs_fused
def test_the_fast_path_runs_fused_onednn_primitives_only():
    """No BatchNorm, ReLU or addition kernels, and none of PyTorch's slow batch-1 conv kernels."""
    fast = optimize_for_inference(_model("resnet18", num_classes=0))  # shortcut A; batch-1 maps small enough for slow kernels
    assert type(fast.layer1[0]) is inference.FusedBasicBlock and type(fast.conv1) is inference.FusedConvReLU3d
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.inference_mode():
        fast.forward_features(x)  # the first call reorders the weights
        ops = _ops(fast.forward_features, x)
    assert "mkldnn::_convolution_pointwise" in ops
    assert not {o for o in ops if "slow_conv" in o or "batch_norm" in o or o in ("aten::relu_", "aten::add")}, ops


def test_the_default_eval_model_runs_the_plain_ops():
    model = _model("resnet10", num_classes=0)
    x = torch.randn(1, 1, 12, 16, 16)
    with torch.inference_mode():
        ops = _ops(model, x)
    assert "aten::batch_norm" in ops and "mkldnn::_convolution_pointwise" not in ops
    assert not any(isinstance(m, inference._FusedBlock) for m in model.modules())


def test_the_plain_model_is_left_untouched_by_optimize():
    model = _model("resnet10")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    assert isinstance(model.bn1, nn.BatchNorm3d) and all(p.requires_grad for p in model.parameters())
    assert type(model.layer1[0]) is med3d_hub.networks.resnet.BasicBlock and isinstance(model.relu, nn.ReLU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm3d) for m in fast.modules())
    assert all(not p.requires_grad for p in fast.parameters())


def test_features_only_models_and_their_surface():
    model = _model("resnet18", features_only=True, out_indices=(0, 2, 4))
    fast = optimize_for_inference(model)
    assert fast.feature_info.channels() == model.feature_info.channels()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        _assert_close(fast(x), _plain(model, x))


def _plain_ops_of(model, x):
    """The same (folded) model through PyTorch's own convs: oneDNN off takes the fused blocks' plain forward."""
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        return model(x)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_changed_weights_are_seen():
    fast = optimize_for_inference(_model("resnet10", num_classes=0))
    x = torch.randn(1, 1, 12, 16, 16)
    with torch.inference_mode():
        fast(x)  # packs the weights
    with torch.no_grad():
        fast.layer1[0].conv1.weight.mul_(0.5)
        fast.layer2[0].conv2.bias.add_(0.1)
    with torch.inference_mode():
        _assert_close(fast(x), _plain_ops_of(fast, x))
    with torch.no_grad():
        fast.layer3[0].conv1.weight.copy_(torch.randn_like(fast.layer3[0].conv1.weight))  # a copy_ into the same tensor
    with torch.inference_mode():
        _assert_close(fast(x), _plain_ops_of(fast, x))


@needs_fused  # without the fused ops there are no packed weights
def test_packed_weights_are_never_saved_and_copies_work():
    model = _model("resnet10", num_classes=2)
    fast = optimize_for_inference(model)
    x = torch.randn(1, 1, 12, 16, 16)
    with torch.inference_mode():
        out = fast(x)
    assert any("_packed_weights" in m.__dict__ for m in fast.modules())
    state = fast.state_dict()
    assert not any(v.is_mkldnn for v in state.values())
    folded = inference.fold_batchnorm(copy.deepcopy(model))
    assert set(state) == set(folded.state_dict())
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert not any(m.__dict__.get("_packed_weights", inference._PackedWeights()).entries for m in clone.modules())
        with torch.inference_mode():
            _assert_close(clone(x), out, rtol=1e-6)
    buffer = io.BytesIO()
    torch.save(fast, buffer)  # the whole module, cache attribute included
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        _assert_close(again(x), out, rtol=1e-6)


def test_input_gradients_take_the_plain_ops():
    model = _model("resnet10", num_classes=0)
    fast = optimize_for_inference(model)
    x = torch.randn(1, 1, 12, 16, 16, requires_grad=True)
    fast(x).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    model(ref_x).sum().backward()
    assert _rel(x.grad, ref_x.grad) <= 1e-3


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_float64_and_disabled_onednn_take_the_plain_ops():
    model = _model("resnet10", num_classes=0)
    fast = optimize_for_inference(model)
    x = torch.randn(1, 1, 12, 16, 16)
    ref = _plain(model, x)
    fast64 = copy.deepcopy(fast).double()
    with torch.inference_mode():
        _assert_close(fast64(x.double()), ref)
        with torch.backends.mkldnn.flags(enabled=False):
            assert "mkldnn::_convolution_pointwise" not in _ops(fast, x)
            _assert_close(fast(x), ref)


def test_bf16_autocast_runs_on_any_cpu():
    """Where oneDNN has no bf16 for this CPU, the fast model takes the plain ops under autocast."""
    model = _model("resnet10", num_classes=0)
    fast = optimize_for_inference(model)
    x = torch.randn(1, 1, 12, 16, 16)
    ref = _plain(model, x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    assert _rel(out, ref) <= 5e-2


def test_bf16_autocast_is_followed_where_the_cpu_has_it():
    from med3d_hub.inference.runtime import _native_cpu_amp

    if not _native_cpu_amp(torch.bfloat16):
        pytest.skip("no native bf16 on this CPU (autocast would be emulated)")
    model = _model("resnet10", num_classes=0)
    fast = optimize_for_inference(model)
    x = torch.randn(1, 1, 16, 24, 24)
    ref = _plain(model, x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.forward_features(x).dtype == torch.bfloat16  # the convs did run in bf16
        assert _rel(fast(x), ref) <= 5e-2  # bf16 keeps 8 bits of mantissa: opt-in only


@needs_fused
@pytest.mark.parametrize("dilation,shape", [(4, (1, 8, 8, 16, 16)), (4, (2, 8, 7, 13, 10)), (3, (1, 8, 7, 9, 11))])
def test_dilated_convs_on_sub_grids_equal_the_dilated_conv(dilation, shape):
    """The bf16 route for large dilations (checked here in fp32, where it must match to rounding)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(shape[1], 16, 3, padding=dilation, dilation=dilation, bias=True).requires_grad_(False)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    residual = torch.randn(shape[0], 16, *shape[2:])
    assert inference._sub_grids_apply(conv)
    with torch.inference_mode():
        out = inference._dilated_on_sub_grids(conv, x, True, residual)
        _assert_close(out, torch.relu(conv(x) + residual), rtol=1e-5)


def test_without_the_fused_ops_the_copy_keeps_the_plain_convs(monkeypatch, caplog):
    """A PyTorch whose private oneDNN op changed: one warning, and the folded channels_last model."""

    def changed_op(*args, **kwargs):
        raise RuntimeError("mkldnn::_convolution_pointwise() expected 13 arguments")

    monkeypatch.setattr(inference, "_fused_conv", changed_op)
    inference.fused_path_available.cache_clear()
    try:
        model = _model("resnet18", num_classes=0)
        with caplog.at_level(logging.WARNING, logger="med3d_hub.inference.optimize"):
            fast = optimize_for_inference(model)
            optimize_for_inference(model)
        assert sum("fused oneDNN conv path is unavailable" in r.message for r in caplog.records) == 1
        assert "expected 13 arguments" in caplog.text
        assert not any(isinstance(m, (inference._FusedBlock, inference.FusedConvReLU3d)) for m in fast.modules())
        x = torch.randn(1, 1, 12, 16, 16)
        with torch.inference_mode():
            _assert_close(fast(x), _plain(model, x))
    finally:
        inference.fused_path_available.cache_clear()


def test_compile_failure_falls_back_to_the_eager_fast_path(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _model("resnet10", num_classes=0)
    fast = optimize_for_inference(model, compile=True)
    x = torch.randn(1, 1, 12, 16, 16)
    with caplog.at_level(logging.WARNING, logger="med3d_hub.inference.optimize"), torch.inference_mode():
        out = fast(x)
        again = fast.forward_features(x)
    _assert_close(out, _plain(model, x))
    assert again.shape[1] == 512
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="input channel"):  # a wrong input is the caller's error
        fast(torch.randn(1, 3, 8, 8, 8))


def test_compile_with_frozen_weights_equals_the_plain_model():
    """The real torch.compile (Inductor, freezing) on the smallest zoo model and a tiny input."""
    model = _model("resnet10", num_classes=3)
    fast = optimize_for_inference(model, compile=True)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.inference_mode():
        out = fast(x)
        stages = fast.forward_stages(x)
    assert fast.stage_outputs.compiled is not None, "compilation fell back to eager"
    _assert_close(out, _plain(model, x))
    _assert_close(stages, _plain(model.forward_stages, x))
