"""The `med3d` command on real files, run as a subprocess (and, for quick checks, through main())."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("nibabel")
pytest.importorskip("pydicom")
pytest.importorskip("nilearn")

from hub_server import HubServer  # noqa: E402
from scan_files import (  # noqa: E402
    ROOT,
    closed_endpoint,
    ct5n,
    manifest_entry,
    med3d_env,
    medicalnet_pth,
    mni_template,
    run_med3d,
    write_broken,
    write_dicom_series,
    write_manifest,
    write_nifti,
)
from skips import needs  # noqa: E402

from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.cli import options, training  # noqa: E402
from med3d_hub.data.io import read_volume  # noqa: E402
from med3d_hub.data.preprocess import Preprocess, transforms_for  # noqa: E402
from med3d_hub.inference.features import extract_features  # noqa: E402
from med3d_hub.weights.hub_model import build_model  # noqa: E402
from med3d_hub.weights.factory import resolve_pretrained  # noqa: E402
from med3d_hub.weights.manifest import read_manifest  # noqa: E402

SIZE = ["--size", "32", "64", "64"]
# The preprocessing the test weights declare in their manifest entry: unlike any default, and small.
HUB_RECIPE = {
    "spacing": [4.0, 4.0, 4.0],
    "intensity": {"method": "nonzero_zscore"},
    "crop_foreground": True,
    "size": [24, 48, 48],
    "size_mode": "resize",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, affine = mni_template()
    nifti = write_nifti(root / "mni.nii.gz", data, affine)
    np.save(root / "mni_flipped.npy", read_volume(nifti).array[:, ::-1].copy())
    weights = medicalnet_pth(root / "resnet_10.pth")
    return {
        "root": root,
        "nifti": str(nifti),
        "dicom": str(write_dicom_series(root / "mni_dicom", data, affine)),
        "ct": str(ct5n()),
        "npy": str(root / "mni_flipped.npy"),
        "broken": str(write_broken(root / "broken.nii.gz")),
        "weights": str(weights),
    }


@pytest.fixture(scope="module")
def plain_model(files):
    """The test weights loaded by hand (no cache, no hub): what the command must reproduce."""
    state = torch.load(files["weights"], weights_only=True)["state_dict"]
    model = build_model("resnet10", num_classes=0)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def hub(files):
    """A test Hub serving the weights, and a private manifest making them resnet10's default."""
    data = open(files["weights"], "rb").read()
    with HubServer() as server:
        server.add_file("med3d-test/MedicalNet-Resnet10", "resnet_10.pth", data)
        manifest = write_manifest(files["root"] / "private.json", manifest_entry("testhub", data, HUB_RECIPE))
        yield server, manifest


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- features on real files ------------------------------------------------------------------------


def test_features_rows_order_and_a_broken_file(files, plain_model, tmp_path):
    env = med3d_env(tmp_path)
    inputs = [files["nifti"], files["broken"], files["ct"], files["dicom"], files["npy"]]
    out = tmp_path / "feats.npz"
    run = run_med3d("features", *inputs, "--pretrained", files["weights"], *SIZE, "-o", out, env=env)
    assert run.returncode == 1, run.stderr  # some inputs failed
    assert "Traceback" not in run.stderr
    assert f"med3d: skipped {files['broken']}" in run.stderr
    assert lines(run.stderr)[-1].startswith("med3d: 1 of 5 input(s) failed")
    with np.load(out) as z:
        feats, names = z["features"], list(z["files"])
    good = [files["nifti"], files["ct"], files["dicom"], files["npy"]]
    assert names == good and feats.shape == (4, 512) and feats.dtype == np.float32
    # The same numbers as the Python API with the same weights and preprocessing.
    expected = extract_features(plain_model, good, preprocess=Preprocess(size=(32, 64, 64)))
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
    # NIfTI and DICOM hold the same brain: same row. Different scans: different rows.
    np.testing.assert_allclose(feats[0], feats[2], rtol=1e-5, atol=1e-6)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3 and np.abs(feats[0] - feats[3]).max() > 1e-3

    # Reversed order, batched, to CSV, quiet: the rows follow the new order and nothing else changes.
    csv_out = tmp_path / "feats.csv"
    run = run_med3d("features", *good[::-1], "--pretrained", files["weights"], *SIZE, "-b", "2", "-q", "-o", csv_out, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    with open(csv_out, newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == good[::-1]
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=np.float32)[::-1], feats, rtol=1e-5, atol=1e-6)


@pytest.mark.hub
def test_download_fills_the_cache_for_offline_features(files, hub, plain_model, tmp_path):
    server, manifest = hub
    env = med3d_env(tmp_path, HF_ENDPOINT=server.endpoint, MED3D_HUB_MANIFEST=str(manifest))
    run = run_med3d("download", "resnet10", env=env)
    assert run.returncode == 0, run.stderr
    assert "resnet10.testhub: sha256" in run.stdout and "verified" in run.stdout
    assert any(method == "GET" and path.endswith("resnet_10.pth") for method, path in server.requests)

    # Offline now (no server, HF_HUB_OFFLINE): the default weights come from the cache, and the
    # features use the preprocessing their manifest entry declares.
    offline = dict(env, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    out = tmp_path / "maps.npy"
    run = run_med3d("features", files["nifti"], files["ct"], "--maps", "-o", out, env=offline)
    assert run.returncode == 0, run.stderr
    assert "resnet10.testhub" in run.stdout and "nonzero_zscore" in run.stdout
    maps = np.load(out)
    assert maps.shape == (2, 512, 3, 6, 6)  # size 24 x 48 x 48 at output stride 8
    expected = extract_features(plain_model, [files["nifti"], files["ct"]], preprocess=Preprocess.from_dict(HUB_RECIPE), maps="layer4")
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)

    run = run_med3d("info", "resnet10", env=offline)
    assert run.returncode == 0, run.stderr
    assert "resnet10.testhub" in run.stdout and "cached" in run.stdout and ".safetensors" in run.stdout


def test_all_inputs_failing_writes_nothing(files, tmp_path):
    out = tmp_path / "f.npy"
    run = run_med3d("features", files["broken"], str(tmp_path / "missing.nii.gz"), "--pretrained", "none", "-o", out,
                    env=med3d_env(tmp_path))
    assert run.returncode == 1
    assert "all 2 input(s) failed" in run.stderr and "RANDOM" in run.stderr
    assert not out.exists()


def test_user_error_is_one_line_without_traceback(tmp_path):
    run = run_med3d("features", "x.nii.gz", "--model", "resnet11", "-o", tmp_path / "f.npy", env=med3d_env(tmp_path))
    assert run.returncode == 2
    assert lines(run.stderr) == [lines(run.stderr)[0]] and "Traceback" not in run.stderr
    assert run.stderr.startswith("med3d: error: unknown model 'resnet11'") and "resnet10" in run.stderr


# -- list, info, help: through main() -------------------------------------------------------------


def test_list_and_info_follow_the_manifest(capsys, monkeypatch, hub):
    _, manifest = hub
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(manifest))
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "resnet10.testhub" in out and "resnet50.3dseg8" in out and "resnet200.3dseg8" in out
    assert cli.main(["list", "resnet5*", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["models"] == ["resnet50"] and {w["name"] for w in listed["weights"]} == {"resnet50.3dseg8", "resnet50.23datasets"}

    assert cli.main(["info", "resnet10", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (entry,) = read_manifest(manifest)
    assert info["name"] == "resnet10.testhub" and info["sha256"] == entry.sha256
    assert info["preprocess"] == entry.preprocess == Preprocess.from_dict(HUB_RECIPE).to_dict()
    assert info["parameters"] == 14_355_520 and info["embedding_dim"] == 512

    monkeypatch.delenv("MED3D_HUB_MANIFEST")
    assert cli.main(["info", "resnet50.3dseg8"]) == 0
    out = capsys.readouterr().out
    for text in ("46,155,072", "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84", "MIT",
                 "TencentMedicalNet/MedicalNet-Resnet50", "percentile_zscore", "resize to 56 x 448 x 448", "1904.00625"):
        assert text in out


def test_transforms_for_matches_the_shipped_manifest():
    from med3d_hub.weights.manifest import SHIPPED_MANIFEST

    doc = (ROOT / "docs" / "preprocessing.md").read_text()
    block = doc.split("<!-- shipped-preprocess:start -->")[1].split("<!-- shipped-preprocess:end -->")[0]
    documented = json.loads(block.strip().removeprefix("```json").removesuffix("```"))
    for entry in read_manifest(SHIPPED_MANIFEST):
        assert transforms_for(entry.cfg()).to_dict() == Preprocess.from_dict(entry.preprocess).to_dict() == documented
        assert transforms_for({"preprocess": entry.preprocess}, size=(8, 8, 8)).size == (8, 8, 8)


def test_help_version_and_usage_errors(capsys, tmp_path, hf_cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint())  # nothing here may reach a real Hub
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("med3d 0.1.0")
    assert cli.main(["features", "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--pretrained" in text and "--maps" in text and "exit code 1" in text
    assert cli.main(["--help"]) == 0
    assert "exit codes:" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["features", "a.nii.gz"]) == 2  # -o is required: argparse's usage error
    assert "required: --output" in capsys.readouterr().err

    cases = {
        ("features", "a.nii.gz", "-o", str(tmp_path / "f.txt")): "unknown output type",
        ("features", "a.nii.gz", "-o", str(tmp_path / "no" / "f.npy")): "does not exist",
        ("features", "a.nii.gz", "-o", str(tmp_path / "f.npy"), "--intensity", "hu_window:1"): "--intensity",
        ("features", "a.nii.gz", "-o", str(tmp_path / "f.npy"), "--size", "1", "2"): "--size takes one value or three",
        ("features", "a.nii.gz", "-o", str(tmp_path / "f.npy"), "--pretrained", str(tmp_path / "w.pth")): "no such file",
        ("features", "a.nii.gz", "-o", str(tmp_path / "f.npy"), "--device", "cuda:7"): "cuda",
        ("info", "resnet10.nope"): "no pretrained weights named resnet10.nope",
        ("download",): "name the weights",
    }
    for argv, message in cases.items():
        code = cli.main(list(argv))
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert lines(err)[-1].startswith("med3d: error: ") and message in err, (argv, err)
        assert "Traceback" not in err


def test_train_is_forwarded(capsys):
    needs(training.train_available(), "the training extra", "pip install 'med3d-hub[train]'")
    assert cli.main(["train", "--help"]) == 0
    assert "med3d train" in capsys.readouterr().out


def test_intensity_and_size_parsing():
    assert options.parse_intensity("hu_window:-200,250") == {"method": "hu_window", "min": -200.0, "max": 250.0}
    assert options.parse_intensity("percentile_zscore:1,99") == {"method": "percentile_zscore", "lower": 1.0, "upper": 99.0}
    assert options.parse_intensity("nonzero-zscore") == {"method": "nonzero_zscore"}
    parser = cli.build_parser()
    args = parser.parse_args(["features", "a", "-o", "f.npy", "--size", "64", "--spacing", "none", "--no-crop-foreground"])
    assert options.preprocess_overrides(args) == {"size": (64, 64, 64), "spacing": None, "crop_foreground": False}
    assert resolve_pretrained("resnet50", "3dseg8") == ("resnet50.3dseg8", True)
    assert resolve_pretrained("resnet50.3dseg8", None) == ("resnet50.3dseg8", True)
    assert resolve_pretrained("resnet50.3dseg8", "none") == ("resnet50", False)
    assert resolve_pretrained("resnet50", "hf://org/repo@abc/w.pth") == ("resnet50", "hf://org/repo@abc/w.pth")


def test_one_pretrained_vocabulary_for_features_and_finetune():
    """`scratch` and `on` mean the same to every command: random weights, the default weights."""
    pytest.importorskip("yaml")
    from med3d_hub.training.finetune_config import PAPER_LR_PRETRAINED, PAPER_LR_SCRATCH, SegFinetuneConfig

    for word in ("none", "false", "random", "scratch", "no", "off", " Scratch "):
        assert resolve_pretrained("resnet50", word) == ("resnet50", False), word
        assert SegFinetuneConfig(pretrained=word).lr == PAPER_LR_SCRATCH, word
    for word in ("default", "true", "yes", "on", None):
        assert resolve_pretrained("resnet50", word) == ("resnet50", True), word
        assert SegFinetuneConfig(pretrained=word or "default").lr == PAPER_LR_PRETRAINED, word
    with pytest.raises(ValueError, match="disagrees"):
        resolve_pretrained("resnet50.3dseg8", "23datasets")


def _help_examples():
    """Every example line of every command's help: `  med3d CMD ...`, its comment after two spaces cut."""
    import re

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    seen = set()
    for sub in commands.values():
        for line in (sub.epilog or "").splitlines():
            match = re.match(r"\s+med3d (\S.*?)(?:\s{2,}.*)?$", line)
            for command in re.split(r"\s*;\s*med3d\s+", match.group(1)) if match else []:
                if command not in seen:
                    seen.add(command)
                    yield command


@pytest.mark.parametrize("example", list(_help_examples()))
def test_every_help_example_parses(example):
    """An example in `--help` that argparse refuses teaches a command that cannot run."""
    import shlex

    args = cli.build_parser().parse_args(shlex.split(example))
    assert callable(args.func)
