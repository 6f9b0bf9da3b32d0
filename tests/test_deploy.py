"""Deploying: ONNX exports checked in onnxruntime, a MONAI bundle run by MONAI, and MONAI's own ResNet.

The weights are MedicalNet-format files made here (tests/medicalnet_files.py), served by name.tag
from the local Hub server, and small fine-tuning runs (2 steps: the numbers, not the accuracy, matter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from med3d_hub.cli.app import main as med3d

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREPROCESS = {"spacing": None, "intensity": {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5},
              "crop_foreground": True, "size": [24, 32, 32], "size_mode": "resize"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served_weights(hub_server, hf_cache, monkeypatch, tmp_path):
    """resnet10.deploy: MedicalNet-format weights on the local Hub, with a small preprocessing."""
    from medicalnet_files import medicalnet_bytes
    from scan_files import manifest_entry, write_manifest

    from med3d_hub.weights import manifest

    data = medicalnet_bytes("resnet10")
    hub_server.add_file("med3d-test/MedicalNet-Resnet10", "resnet_10.pth", data)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    entry = manifest_entry("deploy", data, PREPROCESS, default=False)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "weights.json", entry)))
    monkeypatch.setattr(manifest, "_added", [])
    return entry


def _run_onnx(file: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def _relative(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _finetune(root: Path, task: str) -> Path:
    """A 2-step fine-tuning run of resnet10 from scratch on synthetic data: a real run folder."""
    pytest.importorskip("monai")
    pytest.importorskip("yaml")
    from med3d_hub.cli.finetune import main as finetune
    from med3d_hub.training.synthetic import make_synthetic_task
    from med3d_hub.training.synthetic_classification import make_synthetic_classification

    common = ["--model", "resnet10", "--pretrained", "none", "--crop", "16", "16", "16", "--workers", "0",
              "--device", "cpu", "-q", "--steps", "2", "--val-every", "2", "--batch-size", "2",
              "--cache-dir", str(root / "cache"), "--output", str(root / task)]
    if task == "seg":
        data = make_synthetic_task(root / "data", "Blob", num_classes=2, num_cases=4, shape=(20, 20, 20), seed=5)
        args = ["seg", "--data", str(data), "--set", "val_fraction=0.25", *common]
    else:
        labels = make_synthetic_classification(root / "cls", num_cases=8, shape=(16, 18, 16), seed=4, split=True)
        args = ["cls", "--csv", str(labels), "--num-classes", "2", "--set", "class_names=[dark,bright]", *common]
    assert finetune(args) == 0
    return root / task


# -- ONNX -------------------------------------------------------------------------------------------


def test_the_layer4_map_exports_with_the_torchscript_exporter(tmp_path):
    pytest.importorskip("onnxruntime")
    import med3d_hub

    torch.manual_seed(0)
    model = med3d_hub.create_model("resnet10", num_classes=0).eval()
    done = med3d_hub.export_onnx(model, tmp_path / "onnx", returns="layer4", exporter="torchscript")
    assert done.sidecar["exporter"] == "torchscript" and done.sidecar["output"]["name"] == "layer4"
    x = torch.randn(2, 1, 30, 26, 34)
    with torch.no_grad():
        expected = model.forward_features(x).numpy()
    got = _run_onnx(done.file, x)
    assert got.shape == expected.shape and _relative(got, expected) < 1e-4


def test_a_failed_check_leaves_no_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    from med3d_hub import create_model, export_onnx
    from med3d_hub.publishing.onnx_export import DeployError

    model = create_model("resnet10", num_classes=0).eval()
    with pytest.raises(DeployError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "onnx", exporter="torchscript", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_and_outputs_are_refused_before_any_export(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from med3d_hub import create_model, export_onnx
    from med3d_hub.errors import UsageError

    encoder = create_model("resnet10", num_classes=0)
    with pytest.raises(UsageError, match="no head"):
        export_onnx(encoder, tmp_path / "a", returns="logits")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("kept")
    with pytest.raises(UsageError, match="not an empty folder"):
        export_onnx(encoder, tmp_path / "full")
    assert med3d(["export", str(tmp_path / "no" / "run"), "--format", "onnx", "-o", str(tmp_path / "b")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"] and (tmp_path / "full" / "x").read_text() == "kept"


@pytest.mark.slow
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_onnx_of_a_finetuned_model_gives_its_logits(task, tmp_path):
    pytest.importorskip("onnxruntime")
    from med3d_hub.inference.predictor import load_predictor

    run = _finetune(tmp_path, task)
    out = tmp_path / "onnx"
    assert med3d(["export", str(run), "--format", "onnx", "--output", str(out), "-q"]) == 0
    sidecar = json.loads((out / "model.json").read_text())
    predictor = load_predictor(run)
    assert sidecar["returns"] == "logits" and sidecar["task"] == task
    assert sidecar["class_names"] == predictor.class_names and sidecar["check"]["passed"]
    assert sidecar["preprocess"] == predictor.preprocess.to_dict()
    x = torch.randn(2, 1, 20, 28, 36)
    with torch.no_grad():
        expected = predictor.net(x).numpy()
    got = _run_onnx(out / "model.onnx", x)
    assert got.shape == expected.shape and _relative(got, expected) < 1e-4


# -- MONAI bundle -----------------------------------------------------------------------------------


def _scans(folder: Path) -> list[Path]:
    """Two CT-like scans, one stored in another voxel order with an oblique-free, shifted affine."""
    nib = pytest.importorskip("nibabel")
    folder.mkdir()
    rng = np.random.default_rng(3)
    files = []
    for i, (shape, affine) in enumerate([((30, 28, 26), np.diag([1.5, 1.0, 2.0, 1.0])),
                                         ((26, 30, 22), np.array([[0, -1.2, 0, 10], [0, 0, 1.0, -5],
                                                                  [-2.0, 0, 0, 3], [0, 0, 0, 1]]))]):
        data = rng.normal(0, 300, shape).astype(np.float32)
        data[:2] = 0  # a zero border: crop_foreground has something to crop
        files.append(folder / f"scan_{i}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), files[-1])
    return files


def _doc_commands() -> list[list[str]]:
    """The command block of docs/deploying.md, as argument lists (``med3d`` is ``python -m med3d_hub``)."""
    import shlex

    doc = (ROOT / "docs" / "deploying.md").read_text(encoding="utf-8")
    block = doc.split("<!-- deploy-commands:start -->")[1].split("<!-- deploy-commands:end -->")[0]
    lines = [line for line in block.strip().strip("`").splitlines() if line.strip()]
    return [shlex.split(line) for line in lines]


@pytest.mark.slow
def test_the_documented_exports_run_and_the_bundle_gives_med3d_features(served_weights, tmp_path):
    """docs/deploying.md's block, run as written in a folder holding scans/ (test weights for resnet10.3dseg8)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("monai")
    pytest.importorskip("fire")  # python -m monai.bundle's command line
    import glob

    from medicalnet_files import medicalnet_bytes, sha256
    from monai.bundle import ConfigParser
    from scan_files import manifest_entry, write_manifest

    from med3d_hub import create_model

    # The doc's name, served by the test Hub: an extra manifest that names the test weights resnet10.3dseg8.
    entry = manifest_entry("3dseg8", medicalnet_bytes("resnet10"), PREPROCESS, default=False)
    manifest = write_manifest(tmp_path / "docs-weights.json", entry)
    scans = _scans(tmp_path / "scans")
    env = {**os.environ, "MED3D_HUB_MANIFEST": str(manifest),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for argv in _doc_commands():
        program = [sys.executable, "-m", "med3d_hub"] if argv[0] == "med3d" else [sys.executable]
        args = []
        for arg in argv[1:]:  # the shell's glob
            args += (sorted(glob.glob(arg, root_dir=tmp_path)) if "*" in arg else []) or [arg]
        proc = subprocess.run([*program, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])

    sidecar = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert sidecar["weights_sha256"] == sha256(medicalnet_bytes("resnet10"))
    assert sidecar["preprocess"] == PREPROCESS and sidecar["returns"] == "embedding" and sidecar["opset"] == 18
    assert sidecar["exporter"] == "dynamo" and sidecar["check"]["passed"]
    assert len(sidecar["check"]["shapes"]) == 2 and max(sidecar["check"]["max_relative_error"]) < 1e-4
    bundle = tmp_path / "bundle"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "license", "references", "network_data_format"):
        assert meta[key], key
    assert "med3d-hub" in meta["optional_packages_version"] and meta["license"] == "mit"
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 512
    assert (bundle / "docs" / "README.md").is_file() and (bundle / "LICENSE").is_file()

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)

    outputs = np.load(bundle / "eval" / "outputs.npy")
    assert (bundle / "eval" / "inputs.txt").read_text().split() == [str(p.resolve()) for p in scans]
    expected = np.load(tmp_path / "features.npy")
    assert outputs.shape == expected.shape == (2, 512)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The ONNX file at the preprocessed size, and at a shape the check did not use, as PyTorch computes it.
    model = create_model("resnet10.deploy", pretrained=True, num_classes=0).eval()
    for shape in [(2, 1, 24, 32, 32), (1, 1, 17, 29, 40)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert _relative(_run_onnx(tmp_path / "onnx" / "model.onnx", x), model(x).numpy()) < 1e-4


def test_the_bundle_of_a_segmenter_is_instantiated_by_monai_and_loads_strictly(tmp_path):
    pytest.importorskip("monai")
    from monai.bundle import ConfigParser

    from med3d_hub import create_model
    from med3d_hub.errors import UsageError
    from med3d_hub.models import FinetuneNet
    from med3d_hub.publishing.monai_bundle import export_bundle

    torch.manual_seed(1)
    net = FinetuneNet(create_model("resnet10", num_classes=0), "seg", 3).eval()
    with pytest.raises(UsageError, match="licence"):
        export_bundle(net, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    bundle = export_bundle(net, tmp_path / "bundle", license="CC-BY 4.0")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["license"] == "cc-by-4.0" and meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    rebuilt = parser.get_parsed_content("network_def")
    assert isinstance(rebuilt, FinetuneNet)
    rebuilt.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    x = torch.randn(1, 1, 16, 24, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), net(x))


@pytest.mark.parametrize("intensity", [{"method": "window_scale", "min": -200.0, "max": 300.0},
                                       {"method": "hu_window", "min": -150.0, "max": 250.0}])
def test_the_bundles_monai_transforms_preprocess_as_med3d_hub(intensity, tmp_path):
    pytest.importorskip("monai")
    from monai.bundle import ConfigParser

    from med3d_hub.data.io import read_volume
    from med3d_hub.data.preprocess import Preprocess
    from med3d_hub.errors import UsageError
    from med3d_hub.publishing.monai_bundle import monai_transforms

    preprocess = Preprocess(intensity=intensity, size=(12, 16, 14))
    parser = ConfigParser({"imports": ["$import torch"],
                           "pre": {"_target_": "Compose", "transforms": monai_transforms(preprocess)}})
    for scan in _scans(tmp_path / "scans"):
        ours = preprocess(read_volume(scan))
        theirs = parser.get_parsed_content("pre")({"image": str(scan)})["image"]
        assert theirs.shape == ours.shape == (1, 12, 16, 14)
        assert torch.allclose(torch.as_tensor(theirs), ours, atol=1e-5)
    with pytest.raises(UsageError, match="resize_skimage"):
        monai_transforms(preprocess.replace(size_mode="resize_skimage"))


# -- MONAI's own ResNet -----------------------------------------------------------------------------


def test_monais_resnet_loads_the_med3d_weights_strictly(tmp_path):
    """The recipe of docs/model-zoo.md: MONAI's resnet10 with these arguments takes the weights as they are."""
    pytest.importorskip("monai")
    from medicalnet_files import medicalnet_bytes, state_dict_of
    from monai.networks.nets import resnet10

    from med3d_hub import create_model

    weights = tmp_path / "resnet_10.pth"
    weights.write_bytes(medicalnet_bytes("resnet10"))
    state = torch.load(weights, weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}  # the one key mapping
    monai_net = resnet10(spatial_dims=3, n_input_channels=1, conv1_t_stride=2, shortcut_type="B",
                         bias_downsample=False, feed_forward=False)
    monai_net.load_state_dict(state, strict=True)
    for key, value in state_dict_of(medicalnet_bytes("resnet10")).items():
        assert torch.equal(monai_net.state_dict()[key], value)

    med3d_net = create_model("resnet10", pretrained=str(weights), num_classes=0).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ours, theirs = med3d_net(x), monai_net.eval()(x)
        # The same stem and layer1/2; MONAI strides layer3/4 where Med3D dilates them (output stride 32, not 8).
        assert torch.allclose(med3d_net.stage_outputs(x, (2,))[0], monai_net.layer2(monai_net.layer1(
            monai_net.maxpool(monai_net.act(monai_net.bn1(monai_net.conv1(x)))))), atol=1e-5)
    assert ours.shape == theirs.shape == (1, 512) and not torch.allclose(ours, theirs, atol=1e-3)
