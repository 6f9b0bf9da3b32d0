"""huggingface_hub's PyTorchModelHubMixin on the zoo models: save_pretrained / from_pretrained /
push_to_hub, with config.json taken from the model as it is and strict loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file

import med3d_hub
from med3d_hub.models import Med3DResNet, Med3DResNetFeatures
from med3d_hub.weights.checkpoints import CheckpointMismatchError

pytestmark = pytest.mark.hub  # runs once per huggingface_hub generation (.ci/compat.sh)

ROOT = Path(__file__).resolve().parents[1]


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that a lost buffer shows in the outputs."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _randomised(med3d_hub.create_model("resnet18", num_classes=3, in_chans=2, dilated=False))
    assert isinstance(model, PyTorchModelHubMixin)
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["architecture"], config["shortcut"], config["in_chans"], config["num_classes"]) == ("med3d_resnet18", "A", 2, 3)
    assert config["dilated"] is False and config["strides"] == [1, 2, 2, 2] and config["output_stride"] == 32
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == set(model.state_dict()) and all(t.is_contiguous() for t in tensors.values())

    loaded = Med3DResNet.from_pretrained(tmp_path)
    assert not loaded.training and loaded.pretrained_cfg["head"] == "pretrained"
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert med3d_hub.transforms_for(loaded).to_dict() == med3d_hub.transforms_for(None).to_dict()


def test_the_config_follows_the_model_and_loading_is_strict(tmp_path):
    model = med3d_hub.create_model("resnet10", num_classes=3)
    model.reset_classifier(5)  # a head swapped after construction is what gets saved
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 5
    assert Med3DResNet.from_pretrained(tmp_path).fc.out_features == 5

    with pytest.raises(CheckpointMismatchError, match="linear head fc with 5 classes"):
        Med3DResNet.from_pretrained(tmp_path, num_classes=2)
    with pytest.raises(CheckpointMismatchError, match="differs from the model's"):
        Med3DResNet.from_pretrained(tmp_path, num_classes=0)
    loose = Med3DResNet.from_pretrained(tmp_path, num_classes=2, strict=False)  # opt-in: the head stays fresh
    assert loose.fc.out_features == 2

    # A feature extractor takes the backbone of any saved model and ignores its head.
    features = Med3DResNetFeatures.from_pretrained(tmp_path, out_indices=(2, 4))
    assert features.out_indices == (2, 4) and not hasattr(features, "fc")
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, backbone[k]) for k, v in features.state_dict().items())


def test_a_segmentation_model_with_pretrained_weights_keeps_its_preprocessing(tmp_path):
    model = med3d_hub.create_model("resnet10", seg_classes=4)
    model.pretrained_cfg = {"preprocess": {"intensity": {"method": "hu_window", "min": -200, "max": 250}}}
    model.save_pretrained(tmp_path)
    loaded = Med3DResNet.from_pretrained(tmp_path)
    assert loaded.seg_classes == 4 and loaded.pretrained_cfg["head"] == "pretrained"
    assert med3d_hub.transforms_for(loaded).intensity == {"method": "hu_window", "min": -200.0, "max": 250.0}


def test_push_to_hub_and_from_pretrained_through_the_hub(hub_server, tmp_path):
    """In a subprocess: huggingface_hub reads HF_ENDPOINT when it is imported."""
    code = (
        "import torch, med3d_hub\n"
        "from med3d_hub.models import Med3DResNet\n"
        "torch.manual_seed(0)\n"
        "m = med3d_hub.create_model('resnet10', num_classes=0).eval()\n"
        "m.push_to_hub('med3d-test/mixin')\n"
        "n = Med3DResNet.from_pretrained('med3d-test/mixin')\n"
        "x = torch.randn(1, 1, 24, 24, 24)\n"
        "with torch.no_grad(): assert torch.equal(m(x), n(x))\n"
        "assert n.pretrained_cfg['hf_hub_id'] == 'med3d-test/mixin' and n.pretrained_cfg['head'] is None\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MED3D_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "README.md"):
        assert hub_server.file_bytes("med3d-test/mixin", name)


def test_a_folder_written_before_timm_names_still_loads(tmp_path):
    """config.json now names timm's model (med3d_resnet18); files that say resnet18 read the same."""
    torch.manual_seed(0)
    model = _randomised(med3d_hub.create_model("resnet18", num_classes=3))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "med3d_resnet18"
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "resnet18"}))
    loaded = Med3DResNet.from_pretrained(tmp_path)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    from med3d_hub.publishing.run import read_run

    assert read_run(tmp_path).architecture == "resnet18"
