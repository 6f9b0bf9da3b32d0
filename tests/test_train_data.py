"""Co-training data: case checks (bad cases by file), the preprocessing cache, sampling and crops."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from med3d_hub.data.io import read_volume  # noqa: E402
from med3d_hub.train import main  # noqa: E402
from med3d_hub.training import data as data_mod  # noqa: E402
from med3d_hub.training.config import TaskConfig, TrainConfig  # noqa: E402
from med3d_hub.training.cache import BadCaseWarning, DataError  # noqa: E402
from med3d_hub.training.data import prepare_tasks  # noqa: E402
from med3d_hub.training.sampling import CropDataset, MicroBatchPlan, crop_box, read_crop  # noqa: E402
from med3d_hub.training.synthetic import make_synthetic_task, write_case  # noqa: E402


def _cfg(tmp_path, folders, **kw) -> TrainConfig:
    tasks = [TaskConfig(name=f"T{i}", path=str(f)) for i, f in enumerate(folders)]
    return TrainConfig(tasks=tasks, cache_dir=str(tmp_path / "cache"), crop=(16, 16, 16), val_fraction=0.25, **kw)


def _quiet(*_):
    pass


@pytest.fixture
def two_tasks(tmp_path):
    return [
        make_synthetic_task(tmp_path / "data", "A", num_classes=2, num_cases=4, shape=(12, 16, 14), seed=1),
        make_synthetic_task(tmp_path / "data", "B", num_classes=3, num_cases=4, shape=(14, 12, 16), seed=2),
    ]


def test_preprocessing_follows_the_paper_and_is_cached(tmp_path, two_tasks, monkeypatch):
    cfg = _cfg(tmp_path, two_tasks)
    tasks = prepare_tasks(cfg, log=_quiet)
    assert [t.num_classes for t in tasks] == [2, 3]
    assert [len(t.train) + len(t.val) for t in tasks] == [4, 4] and all(len(t.val) == 1 for t in tasks)
    a = tasks[0]
    spacings = []
    for case in sorted((two_tasks[0] / "imagesTr").iterdir()):
        spacings.append(read_volume(case).spacing)
    assert a.spacing == pytest.approx(tuple(np.median(spacings, axis=0)))  # the dataset's median spacing
    source = read_volume(two_tasks[0] / "imagesTr" / "a_000.nii.gz")
    image, label, fg = a.load("a_000")
    expected = [max(1, round(n * s / t)) for n, s, t in zip(source.shape, source.spacing, a.spacing)]
    assert list(image.shape) == expected == list(label.shape)
    assert image.dtype == np.float32 and abs(image.mean()) < 1e-4 and image.std() == pytest.approx(1, abs=1e-3)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    assert fg.shape[1] == 4 and set(fg[:, 0]) == {1} and (label[tuple(fg[:, 1:].T)] == 1).all()

    # A second run reads nothing: the checks and the arrays come from the cache.
    def fail(*args, **kw):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data_mod, "_inspect", fail)
    monkeypatch.setattr(data_mod, "_preprocess", fail)
    assert [t.train for t in prepare_tasks(cfg, log=_quiet)] == [t.train for t in tasks]
    monkeypatch.undo()

    # A changed source file is checked and preprocessed again, and only that one.
    calls = []
    real_inspect, real_pre = data_mod._inspect, data_mod._preprocess
    monkeypatch.setattr(data_mod, "_inspect", lambda case, *a: calls.append(("inspect", case.case_id)) or real_inspect(case, *a))
    monkeypatch.setattr(data_mod, "_preprocess", lambda case, *a: calls.append(("pre", case.case_id)) or real_pre(case, *a))
    touched = two_tasks[1] / "labelsTr" / "b_002.nii.gz"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    prepare_tasks(cfg, log=_quiet)
    assert calls == [("inspect", "b_002"), ("pre", "b_002")]

    # Other settings: a new cache entry for every case of that task.
    calls.clear()
    changed = cfg.replace(tasks=[cfg.tasks[0], TaskConfig(name="T1", path=str(two_tasks[1]), intensity={"method": "none"})])
    again = prepare_tasks(changed, log=_quiet)
    assert sorted(c for c in calls if c[0] == "pre") == [("pre", f"b_{i:03d}") for i in range(4)]
    assert again[1].folder != tasks[1].folder and again[0].folder == tasks[0].folder


def _bad_label(folder):
    path = folder / "labelsTr" / "a_001.nii.gz"
    image = nib.load(path)
    array = np.asarray(image.dataobj).copy()
    array[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(array, image.affine), path)
    return path, "label value\\(s\\) \\[5\\] outside 0..1"


def _truncated_image(folder):
    path = folder / "imagesTr" / "a_001.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    return path, "not a readable NIfTI"


def _shape_mismatch(folder):
    path = folder / "labelsTr" / "a_001.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-2], image.affine), path)
    return path, "differs from image shape"


def _missing_label(folder):
    path = folder / "labelsTr" / "a_001.nii.gz"
    path.unlink()
    return path, "label file not found"


@pytest.mark.parametrize("damage", [_bad_label, _truncated_image, _shape_mismatch, _missing_label])
def test_a_bad_case_is_reported_by_file(tmp_path, two_tasks, damage):
    path, reason = damage(two_tasks[0])
    cfg = _cfg(tmp_path, two_tasks)
    with pytest.raises(DataError, match=rf"(?s)1 bad case.*{reason}.*--skip-bad-cases") as info:
        prepare_tasks(cfg, log=_quiet)
    assert str(path) in str(info.value)

    with pytest.warns(BadCaseWarning, match=reason) as warned:
        tasks = prepare_tasks(cfg.replace(skip_bad_cases=True), log=_quiet)
    assert str(path) in str(warned[0].message)
    assert "a_001" not in tasks[0].train + tasks[0].val and tasks[0].skipped == ["a_001"]
    assert len(tasks[0].train) + len(tasks[0].val) == 3


def test_the_command_line_names_the_bad_file(tmp_path, two_tasks, capsys):
    path, _ = _bad_label(two_tasks[0])
    argv = ["--data", str(two_tasks[0]), "--data", str(two_tasks[1]), "--output", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "\nmed3d: error: 1 bad case(s) found" in err and str(path) in err


def test_multichannel_images_need_a_channel(tmp_path):
    folder = tmp_path / "Task05_Two"
    rng = np.random.default_rng(0)
    ids, raw = [], []
    for i in range(2):
        image = rng.normal(size=(10, 12, 8, 2)).astype(np.float32)  # (i, j, k, channel)
        raw.append(image)
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "imagesTr" / f"two_{i}.nii.gz")
        nib.save(nib.Nifti1Image((image[..., 1] > 0).astype(np.uint8), np.eye(4)), folder / "labelsTr" / f"two_{i}.nii.gz")
        ids.append(f"two_{i}")
    (folder / "dataset.json").write_text(json.dumps({
        "name": "Two", "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "fg"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids],
    }))
    cfg = TrainConfig(tasks=[TaskConfig(name="Two", path=str(folder))], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"2 channels \(0: T2, 1: ADC\).*set `channel:`"):
        prepare_tasks(cfg, log=_quiet)
    cfg = cfg.replace(tasks=[TaskConfig(name="Two", path=str(folder), channel=1)])
    (task,) = prepare_tasks(cfg, log=_quiet)
    image, label, _ = task.load("two_0")
    assert image.shape == (8, 12, 10)  # (D, H, W) = (k, j, i), as med3d_hub.data.io reads 3-D files
    dhw = [raw[0][..., c].transpose(2, 1, 0).ravel() for c in (0, 1)]
    assert np.corrcoef(image.ravel(), dhw[1])[0, 1] > 0.98  # channel 1 was read (clipped, z-scored)
    assert abs(np.corrcoef(image.ravel(), dhw[0])[0, 1]) < 0.2
    assert (label == (dhw[1] > 0).reshape(label.shape)).all()


def test_micro_batches_are_balanced_and_independent_of_the_process_layout():
    plan = MicroBatchPlan([1, 2], seed=3, per_step=4)
    tasks = [plan.task_of(g) for g in range(300)]
    for cycle in range(100):
        assert sorted(tasks[3 * cycle: 3 * cycle + 3]) == [0, 1, 1]
    assert tasks == [MicroBatchPlan([1, 2], seed=3, per_step=4).task_of(g) for g in range(300)]
    for step in range(3):
        by_ranks = [g for r in range(4) for g in plan.rank_micro_batches(step, r, 1)]
        by_accum = plan.rank_micro_batches(step, 0, 4)
        two_by_two = [g for r in range(2) for g in plan.rank_micro_batches(step, r, 2)]
        assert by_ranks == by_accum == two_by_two == list(range(4 * step, 4 * step + 4))


def test_crops_are_deterministic_padded_and_oversample_foreground(tmp_path, two_tasks):
    tasks = prepare_tasks(_cfg(tmp_path, two_tasks), log=_quiet)
    plan = MicroBatchPlan([1, 1], seed=0, per_step=2)
    dataset = CropDataset(tasks, plan, seed=0, foreground_prob=1.0, augment=True)
    keys = [(g, j) for g in range(12) for j in range(2)]
    first = [dataset[k] for k in keys]
    again = [dataset[k] for k in reversed(keys)][::-1]
    for a, b in zip(first, again):
        assert a["task"] == b["task"] and (a["image"] == b["image"]).all() and (a["label"] == b["label"]).all()
    for sample in first:
        assert sample["image"].shape == sample["label"].shape == (1, 16, 16, 16)
        assert (sample["label"] > 0).any()  # every crop centred on a foreground voxel
    # A volume smaller than the crop is centred and zero-padded.
    rng = np.random.default_rng(0)
    vol = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    start = crop_box(vol.shape, (4, 3, 2), rng)
    out = read_crop(vol, start, (4, 3, 2))
    assert start[0] == -1 and out.shape == (4, 3, 2) and (out[0] == 0).all() and (out[3] == 0).all()
    assert (out[1:3] == vol[:, :, start[2]:start[2] + 2]).all()


def test_case_writer_round_trips_the_axes(tmp_path):
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_case(tmp_path, "c", image, (image > 50).astype(np.uint8), (3.0, 2.0, 1.0))
    back = read_volume(tmp_path / "imagesTr" / "c.nii.gz")
    assert (back.array == image).all() and back.spacing == pytest.approx((3.0, 2.0, 1.0))
    with gzip.open(tmp_path / "labelsTr" / "c.nii.gz") as f:
        assert f.read(4)  # a real gzip NIfTI
