"""extract_features / iter_features on real scans: shapes, order, determinism, failures, writers."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("nibabel")
pytest.importorskip("pydicom")
pytest.importorskip("nilearn")

import med3d_hub  # noqa: E402
from med3d_hub.inference import runtime  # noqa: E402
from med3d_hub.inference.features import (  # noqa: E402
    FeatureExtractionError, check_amp, check_output, extract_features, iter_features, save_features,
)
from med3d_hub.data.io import read_volume  # noqa: E402
from med3d_hub.data.preprocess import Preprocess, transforms_for  # noqa: E402
from scan_files import ct5n, mni_template, write_broken, write_dicom_series, write_nifti  # noqa: E402

SMALL = Preprocess(size=(32, 64, 64))  # the paper's intensity recipe at a test-sized input


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Real scans on disk: the MNI152 brain as NIfTI, as a DICOM series and as .npy; pydicom's CT5N."""
    root = tmp_path_factory.mktemp("scans")
    data, affine = mni_template()
    nifti = write_nifti(root / "mni.nii.gz", data, affine)
    dicom = write_dicom_series(root / "mni_dicom", data, affine)
    flipped = root / "mni_flipped.npy"  # the same brain upside down: another image to the network
    np.save(flipped, read_volume(nifti).array[::-1].copy())
    return {"nifti": str(nifti), "dicom": str(dicom), "ct": str(ct5n()), "npy": str(flipped),
            "broken": str(write_broken(root / "broken.nii.gz"))}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return med3d_hub.create_model("resnet10", num_classes=0).eval()


def test_public_api_is_exported():
    assert med3d_hub.extract_features is extract_features
    assert callable(med3d_hub.read_volume) and callable(med3d_hub.transforms_for)
    assert callable(med3d_hub.optimize_for_inference)


def test_import_stays_light():
    code = "import sys, med3d_hub; print(sorted(m for m in ('nibabel', 'matplotlib', 'pandas', 'nilearn', 'pydicom') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pooled_shapes_order_and_determinism(model, scans):
    inputs = [scans["nifti"], scans["ct"], scans["npy"], scans["dicom"]]
    emb = extract_features(model, inputs, preprocess=SMALL)
    assert emb.shape == (4, 512) and emb.dtype == np.float32 and np.isfinite(emb).all()
    # The NIfTI and the DICOM series hold the same brain in different voxel orders: same features.
    np.testing.assert_allclose(emb[0], emb[3], rtol=1e-5, atol=1e-6)
    # Different scans give different embeddings.
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(emb[i] - emb[j]).max() > 1e-3 * np.abs(emb[i]).max()
    # Row order follows input order, whatever the batching; a second run gives the same numbers.
    again = extract_features(model, inputs[::-1], preprocess=SMALL, batch_size=3)
    np.testing.assert_allclose(again[::-1], emb, rtol=1e-5, atol=1e-6)


def test_fast_path_matches_the_plain_model(model, scans):
    fast = extract_features(model, [scans["nifti"], scans["ct"]], preprocess=SMALL)
    plain = extract_features(model, [scans["nifti"], scans["ct"]], preprocess=SMALL, fast=False)
    assert np.abs(fast - plain).max() <= 1e-4 * np.abs(plain).max()
    # ... and the plain path is the model's own forward.
    x = SMALL(read_volume(scans["ct"]))[None]
    with torch.no_grad():
        np.testing.assert_allclose(plain[1], model(x)[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not model.training  # the caller's model is left as it was


def test_uses_the_weights_preprocessing_by_default(model, scans):
    recipe = {"intensity": {"method": "hu_window", "min": -200, "max": 250}, "size": [24, 48, 48], "size_mode": "crop_pad"}
    model.pretrained_cfg = {"preprocess": recipe}
    try:
        default = extract_features(model, [scans["ct"]])
        explicit = extract_features(model, [scans["ct"]], preprocess=Preprocess.from_dict(recipe))
        other = extract_features(model, [scans["ct"]], preprocess=transforms_for(model, size=(32, 64, 64)))
    finally:
        model.pretrained_cfg = None
    np.testing.assert_array_equal(default, explicit)
    assert not np.allclose(default, other)


def test_maps_layer4_and_stages(model, scans):
    maps = extract_features(model, [scans["nifti"], scans["ct"]], preprocess=SMALL, maps="layer4")
    assert maps.shape == (2, 512, 4, 8, 8)
    pooled = extract_features(model, [scans["nifti"], scans["ct"]], preprocess=SMALL)
    np.testing.assert_allclose(maps.mean(axis=(2, 3, 4)), pooled, rtol=1e-5, atol=1e-6)
    stages = extract_features(model, [scans["ct"]], preprocess=SMALL, maps="stages")
    assert {k: v.shape for k, v in stages.items()} == {
        "layer1": (1, 64, 8, 16, 16), "layer2": (1, 128, 4, 8, 8),
        "layer3": (1, 256, 4, 8, 8), "layer4": (1, 512, 4, 8, 8),
    }
    np.testing.assert_allclose(stages["layer4"][0], maps[1], rtol=1e-5, atol=1e-6)


def test_layer4_maps_of_different_sizes_need_a_fixed_size(model):
    vols = [np.random.default_rng(0).normal(size=s).astype(np.float32) for s in [(16, 32, 32), (16, 40, 32)]]
    with pytest.raises(ValueError, match="fixed size"):
        extract_features(model, vols, preprocess=Preprocess(), maps="layer4")
    assert extract_features(model, vols, preprocess=Preprocess(), batch_size=2).shape == (2, 512)


def test_one_bad_input_is_reported_in_place(model, scans):
    inputs = [scans["ct"], scans["broken"], "missing.nii.gz", scans["nifti"]]
    results = list(iter_features(model, inputs, preprocess=SMALL, batch_size=2))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.ok for r in results] == [True, False, False, True]
    assert scans["broken"] in results[1].error and "NIfTI" in results[1].error
    assert "missing.nii.gz" in results[2].error
    good = extract_features(model, [scans["ct"], scans["nifti"]], preprocess=SMALL)
    np.testing.assert_allclose(np.stack([results[0].features, results[3].features]), good, rtol=1e-5, atol=1e-6)
    with pytest.raises(FeatureExtractionError) as caught:
        extract_features(model, inputs, preprocess=SMALL)
    assert "2 of 4" in str(caught.value) and scans["broken"] in str(caught.value)
    assert [name for name, _ in caught.value.failures] == [scans["broken"], "missing.nii.gz"]


def test_reading_runs_ahead_in_worker_threads(model):
    seen = []

    def recipe(volume):
        seen.append(threading.current_thread().name)
        return SMALL(volume)

    vols = [np.full((8, 16, 16), float(i)) for i in range(4)]
    out = extract_features(model, vols, preprocess=recipe, workers=2)
    assert out.shape == (4, 512)
    assert seen and all(name.startswith("med3d-read") for name in seen)


def test_arrays_volumes_and_single_inputs(model, scans):
    volume = read_volume(scans["ct"])
    from_path = extract_features(model, scans["ct"], preprocess=SMALL)
    from_volume = extract_features(model, volume, preprocess=SMALL)
    from_array = extract_features(model, [volume.array], preprocess=SMALL)  # an array is taken at 1 mm
    assert from_path.shape == (1, 512)
    np.testing.assert_array_equal(from_path, from_volume)
    np.testing.assert_allclose(from_array, from_path, rtol=1e-5, atol=1e-6)  # spacing plays no part here


def test_bad_options_fail_before_reading(model):
    with pytest.raises(ValueError, match="maps"):
        extract_features(model, ["x.nii"], maps="layer9")
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, ["x.nii"], batch_size=0)
    with pytest.raises(ValueError, match="device"):
        extract_features(model, ["x.nii"], device="tpu")
    # A model of two input channels takes inputs of two; a one-channel volume is named as such.
    with pytest.raises(FeatureExtractionError, match=r"<array 0>: 1 channel\(s\), but the model takes 2: give one file per channel"):
        extract_features(med3d_hub.create_model("resnet10", in_chans=2), [np.zeros((8, 8, 8), np.float32)])


def test_amp_is_refused_where_it_is_emulated(monkeypatch):
    cpu = torch.device("cpu")
    assert check_amp(None, cpu) is None
    monkeypatch.setattr(runtime, "_native_cpu_amp", lambda dtype: False)
    with pytest.raises(ValueError, match="hundreds of times slower"):
        check_amp("bf16", cpu)
    with pytest.warns(RuntimeWarning, match="forced"):
        assert check_amp("bf16", cpu, force=True) is torch.bfloat16
    monkeypatch.setattr(runtime, "_native_cpu_amp", lambda dtype: True)
    assert check_amp("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="unknown amp"):
        check_amp("int8", cpu)


@pytest.mark.skipif(not runtime._native_cpu_amp(torch.bfloat16), reason="this CPU has no native bf16")
def test_bf16_autocast_is_close(model, scans):
    fp32 = extract_features(model, [scans["ct"]], preprocess=SMALL)
    bf16 = extract_features(model, [scans["ct"]], preprocess=SMALL, amp="bf16")
    assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()


def test_writers_round_trip(tmp_path):
    feats = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    names = ["a.nii.gz", "dir/b", "c,with,commas.npy"]
    np.testing.assert_array_equal(np.load(save_features(tmp_path / "f.npy", feats, names)), feats)
    with np.load(save_features(tmp_path / "f.npz", feats, names)) as z:  # no pickle needed to read it
        np.testing.assert_array_equal(z["features"], feats)
        assert list(z["files"]) == names
    import csv

    with open(save_features(tmp_path / "f.csv", feats, names), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "f0", "f1", "f2", "f3", "f4"]
    assert [r[0] for r in rows[1:]] == names
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=np.float32), feats)
    stages = {"layer1": np.zeros((3, 2, 1, 1, 1), np.float32), "layer4": np.ones((3, 4, 1, 1, 1), np.float32)}
    with np.load(save_features(tmp_path / "s.npz", stages, names)) as z:
        assert set(z.files) == {"files", "layer1", "layer4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv", "f.npy", "f.npz", "s.npz"]  # no temp files left


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    feats = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = pd.read_parquet(save_features(tmp_path / "f.parquet", feats, ["a", "b"]))
    assert list(frame.columns) == ["file", "f0", "f1", "f2"] and list(frame["file"]) == ["a", "b"]
    np.testing.assert_array_equal(frame[["f0", "f1", "f2"]].to_numpy(), feats)


def test_writer_errors_and_atomicity(tmp_path, monkeypatch):
    feats = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="unknown output type"):
        check_output(tmp_path / "f.txt")
    with pytest.raises(ValueError, match=".npz"):
        check_output(tmp_path / "f.npy", maps="stages")
    with pytest.raises(ValueError, match="pooled"):
        check_output(tmp_path / "f.csv", maps="layer4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output(tmp_path / "no" / "f.npy")
    target = save_features(tmp_path / "keep.npy", feats)
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_features(target, feats * 2)
    np.testing.assert_array_equal(np.load(target), feats)  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npy"]
