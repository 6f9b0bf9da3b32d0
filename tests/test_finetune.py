"""Fine-tuning end to end on CPU: both heads on small synthetic data, metrics, resume, publishable output.

resnet10, 16^3 crops, a handful of steps, in this process (the engine restores its signal handlers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")
pytest.importorskip("yaml")
safetensors = pytest.importorskip("safetensors.torch")

from med3d_hub import create_model  # noqa: E402
from med3d_hub.cli.finetune import main  # noqa: E402
from med3d_hub.finetune import load_finetuned  # noqa: E402
from med3d_hub.training.metrics import read_metrics  # noqa: E402
from med3d_hub.training.synthetic import make_synthetic_task  # noqa: E402
from med3d_hub.training.synthetic_classification import make_synthetic_classification  # noqa: E402

COMMON = ["--model", "resnet10", "--crop", "16", "16", "16", "--workers", "0", "--device", "cpu", "--set", "log_every=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    seg = make_synthetic_task(root / "data", "Synth", num_classes=3, num_cases=4, shape=(20, 24, 20), seed=3)
    csv = make_synthetic_classification(root / "cls", num_cases=12, shape=(16, 18, 16), seed=4, split=True)
    encoder = root / "encoder.safetensors"  # stands in for a co-trained encoder.safetensors
    torch.manual_seed(0)
    state = create_model("resnet10", num_classes=0).state_dict()
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(encoder))
    return {"root": root, "seg": seg, "csv": csv, "encoder": encoder, "cache": root / "cache"}


def _seg(data, out: Path, *extra: str) -> int:
    return main(["seg", "--data", str(data["seg"]), "--cache-dir", str(data["cache"]), "--output", str(out),
                 "--batch-size", "2", "--val-every", "2", "--set", "val_fraction=0.25", *COMMON, *extra])


def _cls(data, out: Path, *extra: str) -> int:
    return main(["cls", "--csv", str(data["csv"]), "--cache-dir", str(data["cache"]), "--output", str(out),
                 "--batch-size", "4", "--val-every", "2", *COMMON, *extra])


def _state(path: Path) -> dict:
    return safetensors.load_file(str(path))


def test_segmentation_from_pretrained_encoder_writes_a_publishable_run(data, tmp_path):
    out = tmp_path / "seg"
    assert _seg(data, out, "--pretrained", str(data["encoder"]), "--steps", "4", "--freeze-epochs", "1") == 0
    for name in ("training_config.yaml", "metrics.jsonl", "curves.png", "finetuned.safetensors", "model.safetensors",
                 "config.json"):
        assert (out / name).is_file(), name
    assert not (out / "config.yaml").exists()  # the folder reads as a model folder, not a co-training run
    records = read_metrics(out / "metrics.jsonl")
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert {"dice/Synth/shape1", "dice/Synth/shape2", "dice/Synth", "dice_mean"} <= set(val[-1])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in train)

    # the encoder moved only after the frozen epoch (2 steps: 3 training cases, 2 crops per step)
    tuned = _state(out / "finetuned.safetensors")
    start = _state(data["encoder"])
    assert not torch.equal(tuned["encoder.conv1.weight"], start["conv1.weight"])
    net = load_finetuned(out)
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)

    from med3d_hub.publishing.run import read_run

    run = read_run(out)
    assert run.kind == "model folder" and run.validation.step == 4
    assert run.training["pretrained"] == str(data["encoder"]) and run.training["lr"] == pytest.approx(1e-3)


def test_conv_seg_head_is_published_with_the_model(data, tmp_path):
    out = tmp_path / "conv_seg"
    assert _seg(data, out, "--pretrained", "none", "--decoder", "conv_seg", "--steps", "2") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["seg_classes"] == 3 and config["seg_upsample"] is True
    from med3d_hub.models import Med3DResNet

    zoo = Med3DResNet.from_pretrained(str(out))
    net = load_finetuned(out)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(zoo(x), net(x), atol=1e-5)


def test_segmentation_resume_continues_the_same_run(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--pretrained", "none", "--set", "augment=false")
    assert _seg(data, straight, *args, "--steps", "4") == 0
    assert _seg(data, resumed, *args, "--steps", "2") == 0
    assert _seg(data, resumed, *args, "--steps", "2") == 2  # a finished folder is not overwritten silently
    assert _seg(data, resumed, *args, "--steps", "4", "--resume") == 0
    a, b = _state(straight / "finetuned.safetensors"), _state(resumed / "finetuned.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), key
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_classification_end_to_end_and_resume(data, tmp_path):
    out = tmp_path / "cls"
    args = ("--pretrained", str(data["encoder"]), "--num-classes", "2", "--class-weights", "balanced")
    assert _cls(data, out, *args, "--steps", "2") == 0
    assert _cls(data, out, *args, "--steps", "4", "--resume") == 0
    records = read_metrics(out / "metrics.jsonl")
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    for key in ("accuracy", "balanced_accuracy", "auc", "val_loss", "recall/0", "recall/1"):
        assert key in val[-1], key
    assert 0.0 <= val[-1]["balanced_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 2 and config["preprocess"]["size"] == [16, 16, 16]
    from med3d_hub.models import Med3DResNet

    zoo = Med3DResNet.from_pretrained(str(out))
    net = load_finetuned(out)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(zoo(x), net(x), atol=1e-5)


def test_new_layers_learn_faster_and_scratch_uses_the_paper_rate(data):
    from med3d_hub.training.finetune import FinetuneJob
    from med3d_hub.training.finetune_config import ClsFinetuneConfig
    from med3d_hub.training.finetune_model import build_finetune_net

    cfg = ClsFinetuneConfig(csv="x.csv", model="resnet10", pretrained=str(data["encoder"]))
    assert cfg.lr == pytest.approx(1e-3)
    net = build_finetune_net(cfg, 2)
    groups = FinetuneJob().optimizer(cfg, net).param_groups
    assert {g["name"]: g["lr_scale"] for g in groups} == {"encoder": 1.0, "new_layers": 10.0}
    assert {g["lr"] for g in groups} == {cfg.lr}  # the scheduler applies lr_scale, once
    scratch = cfg.replace(pretrained="none")
    assert scratch.lr == pytest.approx(1e-2)
    groups = FinetuneJob().optimizer(scratch, build_finetune_net(scratch, 2)).param_groups
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert cfg.replace(pretrained="none", lr=0.005).lr == 0.005


def test_csv_reader_reports_bad_rows_by_line(tmp_path, capsys):
    from med3d_hub.training.classification_data import read_label_csv

    csv = make_synthetic_classification(tmp_path, num_cases=4, shape=(8, 8, 8))
    lines = csv.read_text().splitlines()
    lines += ["volumes/missing.npy,1", "volumes/case_000.npy,two", "volumes/case_001.npy,7", ",1",
              "volumes/case_002.npy,1,extra"]
    csv.write_text("\n".join(lines) + "\n")
    rows, bad = read_label_csv(csv, num_classes=2)
    assert [r.line for r in rows] == [2, 3, 4, 5]
    assert [b.split(":")[0] for b in bad] == ["line 6", "line 7", "line 8", "line 9", "line 10"]
    assert "missing.npy: no such file" in bad[0] and "'two' is not an integer" in bad[1]
    assert "label 7 outside 0..1" in bad[2] and "path is empty" in bad[3] and "3 value(s)" in bad[4]

    status = main(["cls", "--csv", str(csv), "--num-classes", "2", "--output", str(tmp_path / "run"), "--steps", "1",
                   "--cache-dir", str(tmp_path / "cache"), "--pretrained", "none", *COMMON])
    assert status == 2
    err = capsys.readouterr().err
    assert "5 bad row(s)" in err and "line 6:" in err and "line 10:" in err and "--skip-bad-cases" in err


def test_csv_reader_refuses_a_wrong_header_and_a_bad_split(tmp_path):
    from med3d_hub.training.classification_data import read_label_csv
    from med3d_hub.training.cache import DataError

    (tmp_path / "a.npy").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("file,label\na.npy,1\n")
    with pytest.raises(DataError, match="line 1: .* lacks path"):
        read_label_csv(tmp_path / "bad.csv")
    (tmp_path / "split.csv").write_text("path,label,split\na.npy,1,holdout\na.npy,0,VAL\n")
    rows, bad = read_label_csv(tmp_path / "split.csv")
    assert bad == ["line 2: split 'holdout' must be train, val, test or empty"] and rows[0].split == "val"


def test_unreadable_volume_is_reported_by_line_or_skipped(data, tmp_path):
    csv = make_synthetic_classification(tmp_path, num_cases=6, shape=(8, 8, 8))
    (tmp_path / "volumes" / "broken.npy").write_bytes(b"not an array")
    csv.write_text(csv.read_text() + "volumes/broken.npy,1\n")
    from med3d_hub.training.classification_data import prepare_classification
    from med3d_hub.training.cache import BadCaseWarning, DataError
    from med3d_hub.training.finetune_config import ClsFinetuneConfig

    cfg = ClsFinetuneConfig(csv=str(csv), cache_dir=str(tmp_path / "cache"), crop=(8, 8, 8), model="resnet10")
    with pytest.raises(DataError, match=r"line 8: .*broken.npy"):
        prepare_classification(cfg, log=lambda *_: None)
    with pytest.warns(BadCaseWarning, match="line 8"):
        tasks = prepare_classification(cfg.replace(skip_bad_cases=True), log=lambda *_: None)
    assert len(tasks[0].train) + len(tasks[0].val) == 6 and tasks[0].skipped == ["line 8"]


def test_classification_metrics():
    import numpy as np

    from med3d_hub.training.classification_eval import binary_auc, classification_scores

    assert binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    scores = classification_scores(probs, np.array([0, 0, 0, 1]), ["benign", "malignant"])
    assert scores["accuracy"] == 1.0 and scores["balanced_accuracy"] == 1.0 and scores["auc"] == 1.0
    scores = classification_scores(probs, np.array([0, 1, 1, 1]), ["benign", "malignant"])
    assert scores["accuracy"] == 0.5 and scores["balanced_accuracy"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-4)


@pytest.mark.parametrize("name", ["finetune-lung", "finetune-lits-liver", "finetune-lidc-nodule"])
def test_packaged_recipes_parse(name, tmp_path, monkeypatch):
    from med3d_hub.finetune import load_finetune_config

    monkeypatch.chdir(tmp_path)
    cfg = load_finetune_config(f"configs/{name}.yaml")
    assert cfg.optimizer == "adam" and cfg.lr == pytest.approx(1e-3) and cfg.notes
    assert cfg.replace(pretrained="none").lr == pytest.approx(1e-2)
    if cfg.task == "seg":
        assert len(cfg.tasks) == 1 and cfg.decoder == "paper"
    else:
        assert cfg.num_classes == 2 and cfg.class_names == ["benign", "malignant"]
    if name == "finetune-lits-liver":
        assert cfg.tasks[0].intensity == {"method": "hu_window", "min": -200, "max": 250}


def test_med3d_finetune_cli_errors_are_one_user_error(tmp_path, capsys):
    from med3d_hub.cli.app import main as med3d

    assert med3d(["finetune", "seg", "--output", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "one MSD task folder" in capsys.readouterr().err
    assert med3d(["finetune", "cls", "--config", "configs/finetune-lung.yaml"]) == 2
    assert "'seg' recipe" in capsys.readouterr().err
    assert med3d(["finetune", "seg", "--data", str(tmp_path), "--set", "lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_quiet_silences_the_progress_lines_only(data, tmp_path, capsys):
    from med3d_hub.cli import app as cli

    args = ("--pretrained", str(data["encoder"]), "--num-classes", "2", "--steps", "2")
    assert _cls(data, tmp_path / "loud", *args) == 0
    loud = capsys.readouterr().err
    assert "step" in loud and "done" in loud
    assert _cls(data, tmp_path / "quiet", *args, "-q") == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["finetune", "cls", "--csv", str(data["csv"]), "--cache-dir", str(data["cache"]), "--output",
                     str(tmp_path / "quiet-cli"), "--batch-size", "4", *COMMON, *args, "-q"]) == 0
    assert capsys.readouterr().err == ""
    for run in ("quiet", "quiet-cli"):  # the run itself is the same: metrics and weights written
        records = read_metrics(tmp_path / run / "metrics.jsonl")
        assert [r["step"] for r in records if r["kind"] == "train"][-1] == 2
        assert (tmp_path / run / "model.safetensors").is_file()
