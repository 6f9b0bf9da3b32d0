"""MedicalNet checkpoint reading, strict key checks and the in_chans rule, without any server."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from medicalnet_files import medicalnet_bytes

from med3d_hub.weights import checkpoints
from med3d_hub.weights.checkpoints import CheckpointMismatchError
from med3d_hub.weights.hub_model import build_model


class NotATensor:
    """Anything that needs code to unpickle; torch.load(weights_only=True) must refuse it."""


def test_reads_legacy_and_zip_checkpoints_and_strips_module(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(medicalnet_bytes("resnet10"))
    state = checkpoints.read_state_dict(legacy, "medicalnet-pth")
    assert "conv1.weight" in state and "layer1.0.bn1.num_batches_tracked" in state
    assert not any(k.startswith("module.") for k in state)

    plain = tmp_path / "plain.pth"
    torch.save({"module.conv1.weight": torch.ones(64, 1, 7, 7, 7)}, plain)  # zip format, no "state_dict" wrapper
    assert list(checkpoints.read_state_dict(plain, "medicalnet-pth")) == ["conv1.weight"]
    assert checkpoints.detect_format(plain) == "medicalnet-pth"


def test_safetensors_files_are_detected_and_read(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.bin"  # detection is by content, not by name
    save_file({"module.conv1.weight": torch.zeros(64, 1, 7, 7, 7)}, str(path))
    assert checkpoints.detect_format(path) == "safetensors"
    assert list(checkpoints.read_state_dict(path, "safetensors")) == ["conv1.weight"]


def test_files_needing_code_to_unpickle_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": {"x": NotATensor()}}, protocol=2))
    with pytest.raises(CheckpointMismatchError, match="weights_only=True"):
        checkpoints.read_state_dict(path, "medicalnet-pth")
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "arch": "resnet"}, other)
    with pytest.raises(CheckpointMismatchError, match="not a MedicalNet checkpoint"):
        checkpoints.read_state_dict(other, "medicalnet-pth")


def test_strict_check_names_missing_unexpected_and_misshaped_keys():
    model = build_model("resnet10", num_classes=0)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = dict(model.state_dict())
    checkpoints.check_backbone(expected, state, source="ok.pth")  # exact: no error

    del state["layer3.0.conv2.weight"]
    state["layer9.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7, 7)
    with pytest.raises(CheckpointMismatchError) as info:
        checkpoints.check_backbone(expected, state, source="bad.pth")
    text = str(info.value)
    assert "bad.pth" in text and "missing keys: layer3.0.conv2.weight" in text
    assert "unexpected keys: layer9.weight" in text and "conv1.weight (64, 3, 7, 7, 7) in the file" in text


def test_shortcut_mismatch_gets_a_hint():
    model_b = build_model("resnet18", num_classes=0, shortcut="B")
    model_a = build_model("resnet18", num_classes=0)  # the released resnet18 weights use shortcut A
    expected_b = {k: tuple(v.shape) for k, v in model_b.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="trained with shortcut='A'"):
        checkpoints.check_backbone(expected_b, model_a.state_dict(), source="r18.pth")
    assert checkpoints.infer_shortcut(model_a.state_dict()) == "A"
    assert checkpoints.infer_shortcut(model_b.state_dict()) == "B"


def test_in_chans_rule():
    weight = torch.randn(64, 1, 7, 7, 7)
    for n in (2, 3, 5):
        adapted = checkpoints.adapt_in_chans(weight, n)
        assert adapted.shape == (64, n, 7, 7, 7)
        torch.testing.assert_close(adapted, weight.repeat(1, n, 1, 1, 1) / n)
    assert checkpoints.adapt_in_chans(weight, 1) is weight
    # from S trained channels: tile, cut, scale by S / n; down to one channel: sum
    two = torch.randn(64, 2, 7, 7, 7)
    torch.testing.assert_close(checkpoints.adapt_in_chans(two, 3), torch.cat([two, two[:, :1]], 1) * (2 / 3))
    torch.testing.assert_close(checkpoints.adapt_in_chans(two, 1), two.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="in_chans must be an integer >= 1"):
        checkpoints.adapt_in_chans(weight, 0)


def test_repeated_volume_through_an_adapted_first_conv():
    conv = torch.nn.Conv3d(1, 8, 3, bias=False)
    volume = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    weight = conv.weight.detach().double()
    for n in (2, 4):
        adapted = checkpoints.adapt_in_chans(weight, n)
        out = torch.nn.functional.conv3d(volume.repeat(1, n, 1, 1, 1), adapted)
        torch.testing.assert_close(out, torch.nn.functional.conv3d(volume, weight))


def test_prefix_collisions_are_errors():
    with pytest.raises(CheckpointMismatchError, match="both become 'a'"):
        checkpoints.strip_prefix({"module.a": torch.zeros(1), "a": torch.zeros(1)})


def test_buffer_roundtrip_through_bytes():
    buffer = io.BytesIO(medicalnet_bytes("resnet10"))
    raw = torch.load(buffer, weights_only=True)
    assert set(raw) == {"state_dict"} and all(k.startswith("module.") for k in raw["state_dict"])
