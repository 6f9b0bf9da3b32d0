"""Co-training network and encoder export: branches, gradients of unused branches, backbone keys."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from med3d_hub import create_model
from med3d_hub.training.encoder import export_encoder
from med3d_hub.training.model import CoTrainNet

safetensors = pytest.importorskip("safetensors.torch")


def test_each_task_has_its_own_branch_at_the_input_size():
    torch.manual_seed(0)
    net = CoTrainNet("resnet10", ["Brain", "Liver"], [4, 3])
    x = torch.randn(2, 1, 16, 24, 16)
    assert net(x, 0).shape == (2, 4, 16, 24, 16)
    assert net(x, 1).shape == (2, 3, 16, 24, 16)
    assert set(net.state_dict()) - {f"encoder.{k}" for k in create_model("resnet10", num_classes=0).state_dict()} == {
        "branches.Brain.weight", "branches.Brain.bias", "branches.Liver.weight", "branches.Liver.bias"}


def test_every_parameter_gets_a_gradient_and_unused_branches_get_zero():
    torch.manual_seed(0)
    net = CoTrainNet("resnet10", ["A", "B", "C"], [2, 3, 2]).train()
    out = net(torch.randn(2, 1, 16, 16, 16), 1)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None for g in grads.values())  # DDP needs no find_unused_parameters
    for name in ("A", "C"):
        assert all((grads[f"branches.{name}.{p}"] == 0).all() for p in ("weight", "bias"))
    assert grads["branches.B.weight"].abs().sum() > 0 and grads["encoder.conv1.weight"].abs().sum() > 0


def test_exported_encoder_loads_strictly_into_the_zoo_model(tmp_path):
    torch.manual_seed(0)
    net = CoTrainNet("resnet10", ["A", "B"], [2, 3]).to(memory_format=torch.channels_last_3d)
    net.encoder.bn1.running_mean.fill_(0.5)
    path = export_encoder(net.state_dict(), "resnet10", tmp_path / "encoder.safetensors", {"steps": 3})
    tensors = safetensors.load_file(path)
    backbone = create_model("resnet10", num_classes=0)
    assert set(tensors) == set(backbone.state_dict())
    backbone.load_state_dict(tensors, strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval(), backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone.forward_features(x), net.encoder.forward_features(x))
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["arch"] == "resnet10" and f.metadata()["steps"] == "3"
    if importlib.util.find_spec("med3d_hub.weights.pretrained") is not None:
        loaded = create_model("resnet10", pretrained=str(path), num_classes=0)
        assert all(torch.equal(v, tensors[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="encoder keys"):
        export_encoder(net.state_dict(), "resnet18", tmp_path / "wrong.safetensors")
    assert not (tmp_path / "wrong.safetensors").exists()
