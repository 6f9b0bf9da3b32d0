"""med3d predict end to end: fine-tune on synthetic data, predict on held-out scans in their own geometry.

The segmentation run is small (resnet10 from scratch, 16^3 crops, 300 steps, one thread) but
real: the held-out scan is larger than the crop, stored in another voxel order with a non-identity
affine, and its mask must come back on that grid with Dice > 0.8 against its label. Training and
held-out cases come from one distribution: (24, 26, 24) voxels holding a blob of semi-axes 6-9
voxels, large next to the 8-voxel output stride of the paper's decoder (blobs that scale with the
case size would differ in size, and in share of the volume, between training and held-out).
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

CASE_SHAPE, BLOB_RADIUS = (24, 26, 24), (6.0, 9.0)
COMMON = ["--model", "resnet10", "--pretrained", "none", "--crop", "16", "16", "16", "--workers", "0",
          "--device", "cpu", "-q"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reoriented(path: Path, out: Path) -> Path:
    """The same scan in another voxel order (P, S, L) with a shifted origin: a non-identity affine."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    image = nib.load(path)
    image = image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(("P", "S", "L"))))
    affine = image.affine.copy()
    affine[:3, 3] += [12.5, -30.0, 7.0]
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), out)
    return out


def _held_out(root: Path) -> dict:
    """A held-out case larger than the crop, stored in P, S, L voxel order with a shifted origin."""
    held = make_synthetic_task(root / "held", "Held", num_classes=2, num_cases=1, shape=CASE_SHAPE, seed=11,
                               radius=BLOB_RADIUS)
    return {"image": _reoriented(held / "imagesTr" / "held_000.nii.gz", root / "scan.nii.gz"),
            "label": _reoriented(held / "labelsTr" / "held_000.nii.gz", root / "label.nii.gz")}


def _seg_task(root: Path) -> Path:
    task = make_synthetic_task(root / "data", "Blob", num_classes=2, num_cases=6, shape=CASE_SHAPE, seed=5,
                               radius=BLOB_RADIUS)
    meta = json.loads((task / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "blob"}
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def _finetune_seg(root: Path, out: Path, *extra: str) -> Path:
    status = finetune(["seg", "--data", str(_seg_task(root)), "--cache-dir", str(root / "cache"), "--output", str(out),
                       "--set", "val_fraction=0.2", *COMMON, *extra])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """An untrained run (2 steps, the conv_seg head): for the geometry and the error paths, not for Dice."""
    root = tmp_path_factory.mktemp("predict-seg")
    run = _finetune_seg(root, root / "run", "--decoder", "conv_seg", "--batch-size", "2", "--steps", "2",
                        "--val-every", "2")
    return {"root": root, "run": run, **_held_out(root)}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.slow  # about 4 minutes on a quiet 2-core machine: 300 fine-tuning steps
@pytest.mark.timeout(1800)
def test_finetuned_segmentation_predicts_the_held_out_scan_on_its_own_grid(tmp_path):
    """Fine-tune (the paper's decoder, 300 steps), predict a larger, reoriented held-out scan: Dice > 0.8."""
    run = _finetune_seg(tmp_path, tmp_path / "run", "--batch-size", "2", "--steps", "300", "--val-every", "300",
                        "--lr", "0.001")
    held = _held_out(tmp_path)
    out = tmp_path / "masks"
    out.mkdir()
    assert med3d(["predict", str(run), str(held["image"]), "-o", str(out), "--device", "cpu", "-q"]) == 0
    scan, label = nib.load(held["image"]), nib.load(held["label"])
    mask = nib.load(out / "scan.nii.gz")
    assert mask.shape == scan.shape and all(n > 16 for n in scan.shape)
    assert np.array_equal(mask.affine, scan.affine)
    dice = _dice(np.asanyarray(mask.dataobj) == 1, np.asanyarray(label.dataobj) == 1)
    assert dice > 0.8, dice

    # the paper's decoder is not a zoo head: the run's model folder alone holds the encoder, and says where to look
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors"):
        (export / name).write_bytes((run / name).read_bytes())
    with pytest.raises(Exception, match="no head.*finetuned.safetensors"):
        load_predictor(export)


def test_an_export_folder_predicts_as_its_run(seg_run, tmp_path):
    """`med3d export` of the run (the conv_seg head): the same window, preprocessing, label names and masks.

    The export's training_config.yaml names the task folder only, so the label names come from its
    config.json, not from the run's dataset.json."""
    export = tmp_path / "export"
    assert med3d(["export", str(seg_run["run"]), "--output", str(export), "--license", "mit", "-q"]) == 0
    assert json.loads((export / "config.json").read_text())["class_names"] == ["background", "blob"]
    assert str(seg_run["root"]) not in (export / "training_config.yaml").read_text()  # no local path is exported
    from_run, from_export = load_predictor(seg_run["run"]), load_predictor(export)
    assert from_export.window == from_run.window == (16, 16, 16)
    assert from_export.preprocess == from_run.preprocess and from_export.class_names == ["background", "blob"]
    masks = {}
    for name, source in (("run", seg_run["run"]), ("export", export)):
        out = tmp_path / f"masks-{name}"
        out.mkdir()
        assert med3d(["predict", str(source), str(seg_run["image"]), "-o", str(out), "--device", "cpu", "-q"]) == 0
        assert json.loads((out / "scan.json").read_text())["labels"] == {"0": "background", "1": "blob"}
        image = nib.load(out / "scan.nii.gz")
        assert image.header["descrip"].tobytes().rstrip(b"\0") == b"labels 0=background 1=blob"
        masks[name] = np.asanyarray(image.dataobj)
    assert (masks["run"] == masks["export"]).mean() > 0.999


def test_a_run_predicts_on_the_scans_own_grid(seg_run, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    assert med3d(["predict", str(seg_run["run"]), str(seg_run["image"]), "-o", str(out), "--probabilities",
                  "--device", "cpu", "-q"]) == 0
    scan = nib.load(seg_run["image"])
    assert not np.allclose(scan.affine[:3, :3], np.diag(np.diag(scan.affine[:3, :3])))  # really reoriented
    mask = nib.load(out / "scan.nii.gz")
    assert mask.shape == scan.shape and all(n > 16 for n in scan.shape)
    assert np.array_equal(mask.affine, scan.affine)
    data = np.asanyarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    assert b"1=blob" in mask.header["descrip"].tobytes()
    assert json.loads((out / "scan.json").read_text())["labels"] == {"0": "background", "1": "blob"}
    with np.load(out / "scan_probabilities.npz") as maps:
        probs = maps["probabilities"].astype(np.float32)
        assert maps["probabilities"].dtype == np.float16 and probs.shape == (2, *scan.shape)
    assert np.allclose(probs.sum(0), 1.0, atol=2e-3)
    undecided = np.abs(probs[1] - probs[0]) < 1e-2  # float16 rounding may flip a near-tie
    assert np.array_equal(probs.argmax(0)[~undecided], data[~undecided])

    preds = predict(seg_run["run"], [seg_run["image"]], device="cpu")
    assert np.array_equal(preds[0].mask, data) and np.array_equal(preds[0].affine, scan.affine)
    assert preds[0].class_names == ["background", "blob"]

    # `med3d_hub.predict` is the public function and the torchrun entry package: importing the
    # package (as `torchrun -m med3d_hub.predict` does) must leave the documented call working.
    import med3d_hub
    import med3d_hub.predict  # noqa: F401

    by_api = med3d_hub.predict(seg_run["run"], [seg_run["image"]], device="cpu")
    assert np.array_equal(by_api[0].mask, data)


def test_the_mask_undoes_the_orientation_exactly(seg_run):
    """from_canonical inverts read_volume: the canonical array goes back to the file's array."""
    from med3d_hub import read_volume
    from med3d_hub.inference.geometry import from_canonical

    scan = nib.load(seg_run["image"])
    volume = read_volume(seg_run["image"])
    back = from_canonical(volume.array, volume.affine, scan.affine, scan.shape)
    assert np.array_equal(back, np.asanyarray(scan.dataobj))


def test_preprocessing_steps_are_undone_on_the_scans_grid():
    """Resampling, crop to foreground and resize come back to the canonical grid, in place."""
    from med3d_hub.data.io import Volume
    from med3d_hub.data.preprocess import Preprocess
    from med3d_hub.inference import geometry

    array = np.zeros((30, 41, 37), np.float32)
    array[5:25, 8:30, 10:33] = 1.0
    array[10:15, 12:20, 15:22] = 5.0
    volume = Volume(array, (2.0, 0.9, 1.1), np.diag([2.0, 0.9, 1.1, 1.0]), "x")
    pre = Preprocess(spacing=(1.5, 1.5, 1.5), crop_foreground=True, intensity={"method": "none"}, size=(24, 24, 24))
    x, grid = pre.apply(volume)
    assert grid.canonical == (30, 41, 37) and grid.network == (24, 24, 24)
    bright = (x > 3).float()
    back = geometry.to_scan_grid(torch.cat([1 - bright, bright]), pre, grid)
    assert back.shape == (2, 30, 41, 37)
    assert _dice(back.argmax(0).numpy() == 1, array == 5.0) > 0.8
    crop_pad = pre.replace(size_mode="crop_pad", size=(20, 40, 20))
    x, grid = crop_pad.apply(volume)
    back = geometry.to_scan_grid(torch.cat([1 - (x > 3).float(), (x > 3).float()]), crop_pad, grid)
    assert back.shape == (2, 30, 41, 37) and _dice(back.argmax(0).numpy() == 1, array == 5.0) > 0.8


def test_a_dicom_series_gets_a_nifti_with_the_series_geometry(seg_run, tmp_path):
    pytest.importorskip("pydicom")
    from scan_files import write_dicom_series

    from med3d_hub import read_volume
    from med3d_hub.inference.geometry import DHW_TO_IJK

    ras = np.asanyarray(nib.load(seg_run["root"] / "held" / "Task92_Held" / "imagesTr" / "held_000.nii.gz").dataobj)
    series = write_dicom_series(tmp_path / "series", np.rint(ras).astype(np.int16), np.diag([0.9, 0.9, 2.0, 1.0]))
    out = tmp_path / "masks"
    out.mkdir()
    assert med3d(["predict", str(seg_run["run"]), str(series), "-o", str(out), "--device", "cpu", "-q"]) == 0
    volume = read_volume(series)
    mask = nib.load(out / "series.nii.gz")
    assert mask.shape == tuple(reversed(volume.shape))
    assert np.allclose(mask.affine, volume.affine @ DHW_TO_IJK)


def test_a_weights_file_with_its_architecture(seg_run, tmp_path):
    """A local file + --model: the head is read off the file; the preprocessing is the depth's default (as features)."""
    from med3d_hub import create_model

    model = create_model("resnet10", seg_classes=2)
    weights = tmp_path / "seg.safetensors"
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "masks"
    out.mkdir()
    assert med3d(["predict", str(weights), str(seg_run["image"]), "-o", str(out), "--device", "cpu", "-q"]) == 2
    assert med3d(["predict", "--model", "resnet10", str(weights), str(seg_run["image"]), "-o", str(out),
                  "--window", "16", "16", "16", "--device", "cpu", "-q"]) == 0
    assert nib.load(out / "scan.nii.gz").shape == nib.load(seg_run["image"]).shape
    encoder = tmp_path / "encoder.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in create_model("resnet10", num_classes=0).state_dict().items()},
                          str(encoder))
    assert med3d(["predict", "--model", "resnet10", str(encoder), str(seg_run["image"]), "-o", str(out), "-q"]) == 2


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
    assert med3d(["predict", str(seg_run["run"]), str(seg_run["image"]), "-o", str(broken), "-q"]) == 2  # a file
    assert med3d(["predict", str(seg_run["run"]), str(seg_run["image"]), "--device", "cuda:7", "-o", str(out), "-q"]) == 2
    twice = [str(seg_run["image"]), str(seg_run["image"])]
    assert med3d(["predict", str(seg_run["run"]), *twice, "-o", str(out), "-q"]) == 2  # two inputs, one mask name


def test_resume_keeps_the_masks_written_and_writes_the_missing_ones(seg_run, tmp_path, capsys):
    second = tmp_path / "second.nii.gz"
    second.write_bytes(Path(seg_run["image"]).read_bytes())
    out = tmp_path / "masks"
    out.mkdir()
    args = ["predict", str(seg_run["run"]), str(seg_run["image"]), str(second), "-o", str(out), "--device", "cpu"]
    assert med3d([*args, "-q"]) == 0
    kept = (out / "scan.nii.gz").stat().st_ino
    reference = (out / "second.nii.gz").read_bytes()
    (out / "second.json").unlink()  # as a run killed between the mask and its sidecar leaves it
    capsys.readouterr()
    assert med3d([*args, "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out / 'second.nii.gz'}" in said and "scan.nii.gz" not in said.split("\n", 1)[1]
    assert "1 mask(s) already written were kept" in said
    assert (out / "scan.nii.gz").stat().st_ino == kept  # not rewritten
    assert (out / "second.nii.gz").read_bytes() == reference and (out / "second.json").is_file()


def test_a_missing_output_folder_is_created_as_other_writers_do(seg_run, tmp_path, capsys):
    out = tmp_path / "results" / "masks"  # neither folder exists
    status = med3d(["predict", str(seg_run["run"]), str(seg_run["image"]), "-o", f"{out}/", "--device", "cpu", "-q"])
    assert status == 0, capsys.readouterr().err
    mask = nib.load(out / "scan.nii.gz")
    assert mask.shape == nib.load(seg_run["image"]).shape and (out / "scan.json").is_file()


def _cls_run(root: Path, steps: int) -> tuple[Path, list[tuple[Path, int]]]:
    labels = make_synthetic_classification(root / "cls", num_cases=16, shape=(16, 18, 16), seed=4, split=True)
    run = root / "run"
    assert finetune(["cls", "--csv", str(labels), "--cache-dir", str(root / "cache"), "--output", str(run),
                     "--num-classes", "2", "--set", "class_names=[dark,bright]", "--batch-size", "4",
                     "--steps", str(steps), "--val-every", str(steps), "--lr", "0.003", *COMMON]) == 0
    rows = [line.split(",") for line in labels.read_text().splitlines()[1:]]
    return run, [(labels.parent / r[0], int(r[1])) for r in rows if r[2] == "val"]


def _read_table(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_classification_writes_one_row_per_scan_in_order(tmp_path):
    run, held = _cls_run(tmp_path, steps=2)
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"\x93NUMPY garbage")
    inputs = [str(p) for p, _ in held]
    out = tmp_path / "predictions.csv"
    assert med3d(["predict", str(run), inputs[0], str(broken), *inputs[1:], "-o", str(out), "-b", "2", "--device",
                  "cpu", "-q"]) == 1
    table = _read_table(out)
    assert [r["file"] for r in table] == inputs
    assert list(table[0]) == ["file", "p_dark", "p_bright", "predicted"]
    preds = predict(run, inputs, device="cpu", batch_size=3)
    for row, pred in zip(table, preds):
        p = np.array([float(row["p_dark"]), float(row["p_bright"])])
        assert abs(p.sum() - 1) < 1e-5 and row["predicted"] == ["dark", "bright"][int(p.argmax())]
        np.testing.assert_allclose(p, pred.probabilities, rtol=1e-4, atol=1e-6)  # batched or not, the same
    assert med3d(["predict", str(run), *inputs, "-o", str(tmp_path / "masks"), "-q"]) == 2  # a table is needed

    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    out_pq = tmp_path / "predictions.parquet"
    assert med3d(["predict", str(run), *inputs, "-o", str(out_pq), "--device", "cpu", "-q"]) == 0
    frame = pd.read_parquet(out_pq)
    assert list(frame["file"]) == inputs and list(frame["predicted"]) == [r["predicted"] for r in table]


def test_an_export_and_its_published_entry_name_the_classes_as_the_run(tmp_path, hub_server, hf_cache, monkeypatch):
    """The class names of the run travel with its export (config.json) and its manifest entry (source.class_names)."""
    from scan_files import write_manifest

    from med3d_hub.publishing.export import export
    from med3d_hub.publishing.publish import manifest_entry
    from med3d_hub.publishing.run import read_run
    from med3d_hub.weights import manifest

    run, held = _cls_run(tmp_path, steps=2)
    exported = export(read_run(run), tmp_path / "export", license="mit")
    entry = manifest_entry(read_run(exported.folder), exported, repo_id="med3d-test/r10-cls", tag="cls-ft",
                           revision="main")
    assert entry["source"]["class_names"] == ["dark", "bright"]
    hub_server.add_file("med3d-test/r10-cls", "model.safetensors", (exported.folder / "model.safetensors").read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "weights.json", entry)))
    monkeypatch.setattr(manifest, "_added", [])

    inputs = [str(p) for p, _ in held]
    tables = {}
    for name, source in (("run", run), ("export", exported.folder), ("name", "resnet10.cls-ft")):
        out = tmp_path / f"{name}.csv"
        assert med3d(["predict", str(source), *inputs, "-o", str(out), "--device", "cpu", "-q"]) == 0
        tables[name] = _read_table(out)
        assert list(tables[name][0]) == ["file", "p_dark", "p_bright", "predicted"], name
    for name in ("export", "name"):
        assert [r["predicted"] for r in tables[name]] == [r["predicted"] for r in tables["run"]]
        for a, b in zip(tables[name], tables["run"]):
            np.testing.assert_allclose([float(a["p_dark"]), float(a["p_bright"])],
                                       [float(b["p_dark"]), float(b["p_bright"])], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_finetuned_classification_gets_the_held_out_scans_right(tmp_path):
    run, held = _cls_run(tmp_path, steps=30)
    out = tmp_path / "predictions.csv"
    assert med3d(["predict", str(run), *(str(p) for p, _ in held), "-o", str(out), "--device", "cpu", "-q"]) == 0
    table = _read_table(out)
    assert [r["predicted"] for r in table] == [["dark", "bright"][t] for _, t in held], table


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


def test_weights_published_with_their_head_predict_by_name(seg_run, hub_server, hf_cache, monkeypatch, tmp_path):
    """name.tag: the manifest entry gives the head (source.model_kwargs) and the preprocessing; the Hub the file."""
    safetensors = pytest.importorskip("safetensors.torch")
    from scan_files import manifest_entry, write_manifest

    from med3d_hub import create_model
    from med3d_hub.weights import manifest

    torch.manual_seed(2)
    model = create_model("resnet10", seg_classes=2).eval()
    data = safetensors.save({k: v.contiguous() for k, v in model.state_dict().items()})
    hub_server.add_file("med3d-test/r10-seg", "model.safetensors", data)
    preprocess = {"intensity": {"method": "hu_window", "min": -100.0, "max": 400.0}, "spacing": [2.0, 1.0, 1.0]}
    entry = manifest_entry("seg-ft", data, preprocess, default=False)
    entry.update(hf_hub_id="med3d-test/r10-seg", filename="model.safetensors", format="safetensors",
                 source={**entry["source"], "model_kwargs": {"seg_classes": 2}})
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "weights.json", entry)))
    monkeypatch.setattr(manifest, "_added", [])

    predictor = load_predictor("resnet10.seg-ft", window=(16, 16, 16))
    assert predictor.task == "seg" and predictor.preprocess.to_dict()["intensity"]["min"] == -100.0
    by_name = predict(predictor, [seg_run["image"]], device="cpu")[0]
    local = predict(model, [seg_run["image"]], device="cpu", preprocess=preprocess, window=(16, 16, 16))[0]
    assert np.array_equal(by_name.mask, local.mask) and by_name.mask.shape == nib.load(seg_run["image"]).shape


def test_non_finite_voxels_are_checked_as_features_checks_them(tmp_path, capsys):
    """--nan-policy: an input with NaN voxels fails (naming the count), or has them set to 0, as in features."""
    from med3d_hub import create_model
    from med3d_hub.inference.predict import iter_predictions
    from med3d_hub.weights.model_files import write_model_files

    torch.manual_seed(0)
    write_model_files(tmp_path / "model", create_model("resnet10", seg_classes=2, seg_upsample=True).eval(),
                      preprocess={"spacing": None, "intensity": {"method": "none"}, "size": None})
    array = np.random.default_rng(0).normal(size=(16, 20, 18)).astype(np.float32)
    clean = array.copy()
    array[2:4] = np.nan
    np.save(tmp_path / "nan.npy", array)
    predictor = load_predictor(tmp_path / "model", window=(16, 16, 16))
    (failed,) = iter_predictions(predictor, [tmp_path / "nan.npy"], device="cpu")
    assert not failed.ok and str(tmp_path / "nan.npy") in failed.error
    assert f"{2 * 20 * 18:,} of {array.size:,} voxels are NaN or infinite" in failed.error
    clean[2:4] = 0
    (zero,) = predict(predictor, [tmp_path / "nan.npy"], device="cpu", nan_policy="zero")
    (expected,) = predict(predictor, [clean], device="cpu")
    np.testing.assert_array_equal(zero.mask, expected.mask)

    (tmp_path / "masks").mkdir()
    args = ["predict", str(tmp_path / "model"), str(tmp_path / "nan.npy"), "-o", str(tmp_path / "masks"),
            "--window", "16", "16", "16", "--device", "cpu", "-q"]
    assert med3d(args) == 1
    assert "NaN or infinite" in capsys.readouterr().err and not list((tmp_path / "masks").iterdir())
    assert med3d([*args, "--nan-policy", "zero"]) == 0 and list((tmp_path / "masks").iterdir())
