"""med3d predict end to end: fine-tune on synthetic data, predict on held-out scans in their own geometry.

The segmentation run is tiny (resnet10 from scratch, 16^3 crops, a few dozen steps, one thread) but
real: the held-out scan is larger than the crop, stored in another voxel order with a non-identity
affine, and its mask must come back on that grid with Dice > 0.8 against its label.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")
pytest.importorskip("yaml")

from med3d_hub.cli.app import main as med3d  # noqa: E402
from med3d_hub.cli.finetune import main as finetune  # noqa: E402
from med3d_hub.inference.predict import load_predictor, predict  # noqa: E402
from med3d_hub.inference.sliding_window import sliding_window  # noqa: E402
from med3d_hub.training.synthetic import make_synthetic_task  # noqa: E402
from med3d_hub.training.synthetic_classification import make_synthetic_classification  # noqa: E402

COMMON = ["--model", "resnet10", "--pretrained", "none", "--crop", "16", "16", "16", "--workers", "0",
          "--device", "cpu", "-q"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reoriented(path: Path, out: Path) -> Path:
    """The same scan in another voxel order (P, S, L) with a shifted origin: a non-identity affine."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    image = nib.load(path)
    image = image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(("P", "S", "L"))))
    affine = image.affine.copy()
    affine[:3, 3] += [12.5, -30.0, 7.0]
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), out)
    return out


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-seg")
    task = make_synthetic_task(root / "data", "Blob", num_classes=2, num_cases=6, shape=(20, 22, 20), seed=5)
    labels = json.loads((task / "dataset.json").read_text())
    labels["labels"] = {"0": "background", "1": "blob"}
    (task / "dataset.json").write_text(json.dumps(labels))
    out = root / "run"
    status = finetune(["seg", "--data", str(task), "--cache-dir", str(root / "cache"), "--output", str(out),
                       "--batch-size", "4", "--steps", "60", "--val-every", "60", "--lr", "0.003",
                       "--set", "val_fraction=0.2", *COMMON])
    assert status == 0
    held = make_synthetic_task(root / "held", "Held", num_classes=2, num_cases=1, shape=(36, 40, 38), seed=11)
    image = _reoriented(held / "imagesTr" / "held_000.nii.gz", root / "scan.nii.gz")
    label = _reoriented(held / "labelsTr" / "held_000.nii.gz", root / "label.nii.gz")
    return {"root": root, "run": out, "image": image, "label": label, "task": task}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_segmentation_run_predicts_a_mask_on_the_scans_own_grid(seg_run, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    assert med3d(["predict", str(seg_run["run"]), str(seg_run["image"]), "-o", str(out), "--probabilities",
                  "--device", "cpu", "-q"]) == 0
    scan, label = nib.load(seg_run["image"]), nib.load(seg_run["label"])
    mask = nib.load(out / "scan.nii.gz")
    assert mask.shape == scan.shape and mask.shape != (16, 16, 16)
    assert np.array_equal(mask.affine, scan.affine) and not np.allclose(scan.affine[:3, :3], np.diag(np.diag(scan.affine[:3, :3])))
    data = np.asanyarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    dice = _dice(data == 1, np.asanyarray(label.dataobj) == 1)
    assert dice > 0.8, dice
    assert b"1=blob" in mask.header["descrip"].tobytes()
    sidecar = json.loads((out / "scan.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "blob"}
    with np.load(out / "scan_probabilities.npz") as maps:
        probs = maps["probabilities"]
        assert probs.dtype == np.float16 and probs.shape == (2, *scan.shape)
        assert np.array_equal(probs.astype(np.float32).argmax(0), data)
        assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=2e-3)


def test_python_api_matches_the_command_and_keeps_the_geometry(seg_run):
    preds = predict(seg_run["run"], [seg_run["image"]], device="cpu")
    scan = nib.load(seg_run["image"])
    assert preds[0].mask.shape == scan.shape and np.array_equal(preds[0].affine, scan.affine)
    assert preds[0].class_names == ["background", "blob"]


def test_export_folder_and_a_dicom_free_array_input(seg_run, tmp_path):
    """A model folder (config.json + model.safetensors with a conv_seg head) predicts through the same path."""
    from med3d_hub.inference.predict import Predictor

    predictor = load_predictor(seg_run["run"])
    assert isinstance(predictor, Predictor) and predictor.task == "seg" and predictor.window == (16, 16, 16)
    array = np.asanyarray(nib.load(seg_run["image"]).dataobj).astype(np.float32)
    preds = predict(predictor, [array, seg_run["image"]], device="cpu")
    assert preds[0].mask.shape == array.shape and preds[0].kind == "array"


def test_bad_inputs_are_reported_and_skipped_the_others_written(seg_run, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    out = tmp_path / "masks"
    out.mkdir()
    status = med3d(["predict", str(seg_run["run"]), str(broken), str(seg_run["image"]), str(tmp_path / "missing.nii"),
                    "-o", str(out), "--device", "cpu", "-q"])
    assert status == 1
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "missing.nii" in err
    assert sorted(p.name for p in out.iterdir()) == ["scan.json", "scan.nii.gz"]  # nothing half-written, nothing else

    assert med3d(["predict", str(seg_run["run"]), str(broken), "-o", str(out), "--device", "cpu", "-q"]) == 1
    assert med3d(["predict", str(tmp_path / "nowhere"), str(seg_run["image"]), "-o", str(out), "-q"]) == 2
    assert med3d(["predict", str(seg_run["run"]), str(seg_run["image"]), "-o", str(tmp_path / "absent"), "-q"]) == 2
    assert med3d(["predict", str(seg_run["run"]), str(seg_run["image"]), "--device", "cuda:7", "-o", str(out), "-q"]) == 2
    twice = [str(seg_run["image"]), str(seg_run["image"])]
    assert med3d(["predict", str(seg_run["run"]), *twice, "-o", str(out), "-q"]) == 2  # two inputs, one mask name


def test_classification_run_writes_one_row_per_scan_in_order(tmp_path):
    labels = make_synthetic_classification(tmp_path / "cls", num_cases=16, shape=(16, 18, 16), seed=4, split=True)
    run = tmp_path / "run"
    assert finetune(["cls", "--csv", str(labels), "--cache-dir", str(tmp_path / "cache"), "--output", str(run),
                     "--num-classes", "2", "--set", "class_names=[dark,bright]", "--batch-size", "4",
                     "--steps", "30", "--val-every", "30", "--lr", "0.003", *COMMON]) == 0
    rows = [line.split(",") for line in labels.read_text().splitlines()[1:]]
    held = [(labels.parent / r[0], int(r[1])) for r in rows if r[2] == "val"]
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"\x93NUMPY garbage")
    inputs = [str(p) for p, _ in held]
    out = tmp_path / "predictions.csv"
    assert med3d(["predict", str(run), inputs[0], str(broken), *inputs[1:], "-o", str(out), "-b", "2", "--device",
                  "cpu", "-q"]) == 1
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert [r["file"] for r in table] == inputs
    assert set(table[0]) == {"file", "p_dark", "p_bright", "predicted"}
    for row, (_, truth) in zip(table, held):
        p = np.array([float(row["p_dark"]), float(row["p_bright"])])
        assert abs(p.sum() - 1) < 1e-5 and row["predicted"] == ["dark", "bright"][int(p.argmax())]
    correct = sum(r["predicted"] == ["dark", "bright"][t] for r, (_, t) in zip(table, held))
    assert correct == len(held), table

    parquet = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    out_pq = tmp_path / "predictions.parquet"
    assert med3d(["predict", str(run), *inputs, "-o", str(out_pq), "--device", "cpu", "-q"]) == 0
    frame = parquet.read_parquet(out_pq)
    assert list(frame["file"]) == inputs and list(frame["predicted"]) == [r["predicted"] for r in table]


def test_sliding_window_equals_monais():
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    for shape, roi, overlap in (((1, 1, 20, 37, 30), (16, 16, 16), 0.25), ((2, 1, 10, 40, 17), (16, 24, 16), 0.5),
                                ((1, 1, 33, 33, 33), (16, 16, 16), 0.0)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = sliding_window_inference(x, roi, 2, net, overlap=overlap, mode="gaussian")
            got = sliding_window(x, roi, net, batch_size=2, overlap=overlap)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
