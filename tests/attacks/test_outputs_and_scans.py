"""Cases 4, 5 and 7: outputs that would destroy inputs, non-finite voxels, headers that lie about size."""

from __future__ import annotations

import gzip
import io
import os
import time
import tracemalloc

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")  # the io extra

from scan_files import med3d_env, run_med3d, write_broken  # noqa: E402

import med3d_hub  # noqa: E402
from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.cli import features as features_command  # noqa: E402
from med3d_hub.data.io import VolumeReadError, read_volume  # noqa: E402
from med3d_hub.inference.features import FeatureExtractionError, check_output, extract_features  # noqa: E402

PREPROCESS = {"spacing": None, "size": [16, 16, 16], "intensity": {"method": "none"}, "crop_foreground": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return med3d_hub.create_model("resnet10", num_classes=0).eval()


def scan(tmp_path, name="vol.npy", nan_fraction=0.0):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(16, 16, 16)).astype(np.float32)
    if nan_fraction:
        array.reshape(-1)[: int(array.size * nan_fraction)] = np.nan
    path = tmp_path / name
    np.save(path, array)
    return path, array


# -- case 4: the output is one of the inputs ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "relative"])
def test_an_output_that_is_an_input_is_refused_before_any_work(tmp_path, monkeypatch, capsys, how):
    path, _ = scan(tmp_path)
    before = path.read_bytes()
    output = {"same": path, "symlink": tmp_path / "link.npy", "hardlink": tmp_path / "hard.npy",
              "relative": tmp_path / "sub" / ".." / "vol.npy"}[how]
    if how == "symlink":
        output.symlink_to(path)
    elif how == "hardlink":
        os.link(path, output)
    elif how == "relative":
        (tmp_path / "sub").mkdir()
    monkeypatch.setattr(features_command, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    assert cli.main(["features", str(path), "-o", str(output), "--pretrained", "none"]) == 2
    err = capsys.readouterr().err
    assert "is the input" in err and str(path) in err
    assert path.read_bytes() == before


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    path, _ = scan(tmp_path)
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores modes: a read-only file system instead
        folder = "/sys"
        if os.access(folder, os.W_OK) and os.geteuid() != 0:
            pytest.skip("no unwritable folder on this machine")
    monkeypatch.setattr(features_command, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    code = cli.main(["features", str(path), "-o", f"{folder}/features.npy", "--pretrained", "none"])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


# -- case 5: NaN and Inf voxels --------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 1.0])
@pytest.mark.parametrize("fast", [True, False])
def test_non_finite_voxels_are_an_error_naming_the_file_and_count(model, tmp_path, fraction, fast):
    path, array = scan(tmp_path, nan_fraction=fraction)
    with pytest.raises(FeatureExtractionError) as raised:
        extract_features(model, [path], preprocess=PREPROCESS, fast=fast)
    message = str(raised.value)
    assert str(path) in message and f"{int(array.size * fraction):,} of {array.size:,} voxels" in message


def test_nan_policy_zero_equals_the_scan_with_zeros(model, tmp_path):
    path, array = scan(tmp_path, nan_fraction=0.1)
    got = extract_features(model, [path], preprocess=PREPROCESS, nan_policy="zero")
    expected = extract_features(model, [np.nan_to_num(array, nan=0.0)], preprocess=PREPROCESS)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_command_reports_non_finite_scans_and_takes_nan_policy(tmp_path, capsys):
    path, _ = scan(tmp_path, nan_fraction=0.1)
    args = ["features", str(path), "-o", str(tmp_path / "f.npy"), "--pretrained", "none", "--size", "16",
            "--spacing", "none", "--intensity", "none"]
    assert cli.main(args) == 1
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "f.npy").exists()
    assert cli.main([*args, "--nan-policy", "zero"]) == 0
    assert np.isfinite(np.load(tmp_path / "f.npy")).all()


def test_weights_with_nan_are_refused_at_load(tmp_path):
    from safetensors.torch import save_file

    from med3d_hub.weights.model_files import NonFiniteWeightsError

    state = med3d_hub.create_model("resnet10", num_classes=0).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteWeightsError, match="layer1.0.conv1.weight"):
        med3d_hub.create_model("resnet10", pretrained=str(tmp_path / "nan.safetensors"), num_classes=0)


# -- case 7: headers that lie about the size -----------------------------------------------------------


def lying_nifti(path, shape, *, gz: bool):
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\1\0" * 8
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.mark.parametrize("shape, gz", [((1200, 1200, 1200), True), ((600, 600, 600), True), ((300, 300, 300), False)])
def test_a_header_that_lies_about_size_is_refused_before_reading(tmp_path, shape, gz):
    path = lying_nifti(tmp_path / ("lie.nii.gz" if gz else "lie.nii"), shape, gz=gz)
    tracemalloc.start()
    try:
        with pytest.raises(VolumeReadError) as raised:
            read_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20, f"{peak} bytes allocated for a header of {shape}"  # the header alone is read
    assert " x ".join(map(str, shape)) in str(raised.value) and "int16" in str(raised.value)


def test_a_npy_header_that_lies_about_size_is_refused(tmp_path):
    path = tmp_path / "lie.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (512, 512, 512)})
        f.write(b"\0" * 64)
    with pytest.raises(VolumeReadError, match="512 x 512 x 512 float32"):
        read_volume(path)


def test_the_voxel_limit_is_a_setting(tmp_path, monkeypatch):
    path, _ = scan(tmp_path)
    monkeypatch.setenv("MED3D_MAX_VOXELS", "1000")
    with pytest.raises(VolumeReadError, match="MED3D_MAX_VOXELS"):
        read_volume(path)
    monkeypatch.setenv("MED3D_MAX_VOXELS", "4096")
    assert read_volume(path).shape == (16, 16, 16)


# -- held today: bad scans --------------------------------------------------------------------------------


def test_broken_scans_are_skipped_and_named(tmp_path, capsys):
    good, _ = scan(tmp_path)
    broken = write_broken(tmp_path / "broken.nii.gz")
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    args = ["features", str(good), str(broken), str(empty), "-o", str(tmp_path / "f.npy"), "--pretrained", "none",
            "--size", "16", "--spacing", "none", "--intensity", "none"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert str(broken) in err and str(empty) in err
    assert np.load(tmp_path / "f.npy").shape == (1, 512)


def test_a_stale_temporary_output_of_a_killed_run_is_removed(tmp_path):
    path, _ = scan(tmp_path)
    stale = tmp_path / ".f.npy.abc123.tmp"
    stale.write_bytes(b"0" * 1000)
    fresh = tmp_path / ".f.npy.def456.tmp"
    fresh.write_bytes(b"1")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    check_output(tmp_path / "f.npy", inputs=[path])
    assert not stale.exists() and fresh.exists()
