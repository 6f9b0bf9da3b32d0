"""timm's own tools on Med3D models, random and pretrained: data config, layer decay, feature hooks,
intermediate features, head reset, checkpoint_path, pretrained_cfg_overlay, and registration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402
from timm.data import resolve_model_data_config  # noqa: E402
from timm.models import FeatureHooks, load_checkpoint  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import med3d_hub  # noqa: E402  (registers the med3d_ models with timm)

X = torch.randn(1, 1, 16, 32, 32)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """resnet18 weights in a file, as a fine-tuned or downloaded model would be."""
    torch.manual_seed(0)
    source = med3d_hub.create_model("resnet18", num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path, source.state_dict()


@pytest.fixture(params=["random", "pretrained"])
def model(request, weights_file, hf_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MED3D_HUB_CACHE", str(tmp_path / "cache"))
    if request.param == "random":
        return timm.create_model("med3d_resnet18", num_classes=3)
    path, state = weights_file
    loaded = timm.create_model("med3d_resnet18", pretrained=True, num_classes=3, pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(loaded.layer3[1].conv2.weight, state["layer3.1.conv2.weight"]), "the overlay's file was not loaded"
    assert loaded.pretrained_cfg["file"] == str(path.resolve())
    return loaded


def test_resolve_model_data_config_is_3d(model):
    config = resolve_model_data_config(model)
    assert list(config["input_size"]) == [1, 56, 448, 448]
    assert list(config["mean"]) == [0.0] and list(config["std"]) == [1.0]
    assert model.pretrained_cfg["first_conv"] == "conv1" and model.pretrained_cfg["classifier"] == "fc"
    assert model.pretrained_cfg["num_classes"] == 3 and model.default_cfg is model.pretrained_cfg


def test_layer_decay_scales_each_stage(model):
    optimizer = create_optimizer_v2(model, "sgd", lr=1.0, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    stem, first, last, head = (scale[id(p)] for p in
                               (model.conv1.weight, model.layer1[0].conv1.weight, model.layer4[1].conv2.weight, model.fc.weight))
    assert stem < first < last < head == 1.0
    assert len({round(s, 6) for s in scale.values()}) == 10  # stem, 8 blocks, head


def test_feature_hooks_on_feature_info(model):
    names = model.feature_info.module_name()
    hooks = FeatureHooks([{"module": n} for n in names], model.named_modules())
    model.eval()
    with torch.no_grad():
        model(X)
        hooked = hooks.get_output(X.device)
        _, maps = model.forward_intermediates(X)
    assert list(hooked) == names == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    for got, expected in zip(hooked.values(), maps):
        torch.testing.assert_close(got, expected)


def test_forward_intermediates_and_reset_classifier(model):
    model.eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(X, indices=2)
        only = model.forward_intermediates(X, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(X))
        assert len(maps) == 2 and maps[-1].shape == final.shape and len(only) == 2
        model.reset_classifier(5, "avg")
        assert model(X).shape == (1, 5)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, "max")


def test_checkpoint_path_loads_through_timm(weights_file):
    path, state = weights_file
    model = timm.create_model("med3d_resnet18", num_classes=0, checkpoint_path=str(path))
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    load_checkpoint(model, str(path))


def test_importing_med3d_hub_before_timm_registers_the_models():
    code = "import med3d_hub, timm; print(type(timm.create_model('med3d_resnet10', num_classes=0)).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Med3DResNet"


def _saved_folder(folder):
    """A save_pretrained folder of a resnet18 with a 3-class head, 2 input channels and non-trivial BatchNorm statistics."""
    torch.manual_seed(1)
    saved = med3d_hub.create_model("resnet18", num_classes=3, in_chans=2)
    with torch.no_grad():
        for name, buffer in saved.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    saved.pretrained_cfg = {"preprocess": {"intensity": {"method": "hu_window", "min": -200, "max": 250}}}
    saved.save_pretrained(folder)
    return saved.eval()


def _timm_has_local_dir() -> bool:
    from packaging.version import Version

    return Version(timm.__version__) >= Version("1.0.16")  # local-dir: came with timm 1.0.16


@pytest.mark.skipif(not _timm_has_local_dir(), reason="timm.create_model('local-dir:...') needs timm 1.0.16")
def test_timm_local_dir_builds_the_saved_model_with_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MED3D_HUB_CACHE", str(tmp_path / "cache"))
    saved = _saved_folder(tmp_path / "model")
    model = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True)
    assert isinstance(model, med3d_hub.models.Med3DResNet) and (model.in_chans, model.num_classes) == (2, 3)
    x = torch.randn(2, 2, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), saved(x), rtol=0, atol=0)
    assert model.pretrained_cfg["preprocess"]["intensity"]["method"] == "hu_window"
    assert resolve_model_data_config(model)["input_size"][0] == 2

    # timm's head override: the saved backbone, a fresh 5-class head
    five = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True, num_classes=5)
    assert five.fc.out_features == 5 and torch.equal(five.layer4[1].conv2.weight, saved.layer4[1].conv2.weight)
    # without pretrained: the saved network's settings, random weights
    random = timm.create_model(f"local-dir:{tmp_path / 'model'}")
    assert (random.in_chans, random.num_classes) == (2, 3) and not torch.equal(random.conv1.weight, saved.conv1.weight)


def _timm_works_with_this_huggingface_hub() -> bool:
    """Older timm cannot import a newer huggingface_hub (timm 1.0.3 with 2.x): its hf-hub: then refuses to run."""
    from timm.models._hub import has_hf_hub

    return has_hf_hub(necessary=False)


@pytest.mark.hub
@pytest.mark.skipif(not _timm_works_with_this_huggingface_hub(), reason="this timm cannot use the installed huggingface_hub")
def test_timm_hf_hub_builds_a_pushed_model_with_its_weights(hub_server, tmp_path):
    """timm's hf-hub: reads the repo's config.json, which names med3d_resnet10. In a subprocess, since
    huggingface_hub reads HF_ENDPOINT when it is imported."""
    code = (
        "import torch, timm, med3d_hub\n"
        "torch.manual_seed(0)\n"
        "m = med3d_hub.create_model('resnet10', num_classes=4).eval()\n"
        "m.push_to_hub('med3d-test/timm')\n"
        "n = timm.create_model('hf-hub:med3d-test/timm', pretrained=True).eval()\n"
        "x = torch.randn(1, 1, 24, 24, 24)\n"
        "assert all(torch.equal(v, n.state_dict()[k]) for k, v in m.state_dict().items())\n"
        "with torch.no_grad(): torch.testing.assert_close(n(x), m(x))\n"
        "assert type(n).__name__ == 'Med3DResNet' and n.fc.out_features == 4\n"
        "assert n.pretrained_cfg['hf_hub_id'] == 'med3d-test/timm' and n.pretrained_cfg['head'] == 'pretrained'\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MED3D_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(root)) if p))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
