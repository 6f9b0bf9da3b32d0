"""Co-training config: the packaged 3DSeg-8 file, YAML errors, flag overrides, --data folders."""

from __future__ import annotations

import pytest

pytest.importorskip("yaml")

from med3d_hub.cli.train import build_config, parser  # noqa: E402
from med3d_hub.training.config import ConfigError, TrainConfig, load_config, resolve_config_path  # noqa: E402
from med3d_hub.training.synthetic import make_synthetic_task  # noqa: E402

MSD_3DSEG8 = {
    "BrainTumour": ("Task01_BrainTumour", 4),
    "Heart": ("Task02_Heart", 2),
    "Liver": ("Task03_Liver", 3),
    "Hippocampus": ("Task04_Hippocampus", 3),
    "Prostate": ("Task05_Prostate", 3),
    "Pancreas": ("Task07_Pancreas", 3),
    "HepaticVessel": ("Task08_HepaticVessel", 3),
    "Spleen": ("Task09_Spleen", 2),
}


def test_packaged_3dseg8_lists_the_eight_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local configs/ folder: the packaged file is used
    path = resolve_config_path("configs/3dseg8.yaml")
    assert path.is_file() and path.parent.name == "configs"
    cfg = load_config("configs/3dseg8.yaml")
    assert {t.name: (t.path, t.num_classes) for t in cfg.tasks} == MSD_3DSEG8
    assert all(t.notes for t in cfg.tasks)  # where to download each
    multi_channel = {t.name: t.channel for t in cfg.tasks if t.channel is not None}
    assert multi_channel == {"BrainTumour": 0, "Prostate": 0}
    assert resolve_config_path("3dseg8") == path


def test_local_config_wins_and_unknown_keys_are_named(tmp_path):
    local = tmp_path / "configs" / "3dseg8.yaml"
    local.parent.mkdir()
    local.write_text("steps: 7\ntasks: []\n")
    assert load_config(local).steps == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("step: 7\n")
    with pytest.raises(ConfigError, match=r"unknown key 'step' \(did you mean 'steps'\?\)"):
        load_config(bad)
    bad.write_text("tasks:\n  - {name: Spleen, path: x, num_classes: 1}\n")
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"crop": (32, 32)}, "crop"),
        ({"amp": "fp8"}, "amp"),
        ({"model": "resnet11"}, "resnet10, resnet18"),
        ({"lr": 0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"foreground_prob": 1.5}, "foreground_prob"),
        ({"tasks": [{"name": "a.b", "path": "x"}]}, "identifier"),
    ],
)
def test_invalid_values_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().replace(**changes)


def test_flags_override_the_config(tmp_path):
    pytest.importorskip("nibabel")  # the synthetic tasks are NIfTI files (the train extra)
    folder = make_synthetic_task(tmp_path, "Spleenish", num_classes=2, num_cases=1, folder_name="Task09_Spleen")
    other = make_synthetic_task(tmp_path, "Other", num_classes=3, num_cases=1)
    args = parser().parse_args([
        "--config", "configs/3dseg8.yaml", "--data", str(folder), "--data", str(other), "--steps", "5",
        "--crop", "32", "32", "32", "--batch-size", "1", "--output", str(tmp_path / "run"), "--device", "cpu",
        "--set", "val_every=3", "--set", "optimizer=adamw", "--skip-bad-cases",
    ])
    cfg = build_config(args)
    assert (cfg.steps, cfg.crop, cfg.batch_size, cfg.val_every, cfg.optimizer) == (5, (32, 32, 32), 1, 3, "adamw")
    assert cfg.skip_bad_cases is True and cfg.device == "cpu"
    spleen, new = cfg.tasks
    assert (spleen.name, spleen.num_classes, spleen.path) == ("Spleen", 2, str(folder))  # the configured task
    assert (new.name, new.num_classes) == ("Other", None)  # classes come from dataset.json
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config(parser().parse_args(["--set", "steps"]))


def test_dist_backend_auto_takes_gloo_where_processes_share_a_gpu(monkeypatch):
    """NCCL refuses two processes on one GPU; auto then takes gloo, and nccl is refused on CPUs."""
    import torch

    from med3d_hub.errors import UsageError
    from med3d_hub.inference.distributed import pick_backend

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cuda = torch.device("cuda", 0)
    assert pick_backend("auto", cuda, 1) == "nccl"
    assert pick_backend("auto", cuda, 2) == "gloo"
    assert pick_backend("nccl", cuda, 2) == "nccl"  # asked for: NCCL itself says whether it can
    assert pick_backend("auto", torch.device("cpu"), 2) == "gloo"
    with pytest.raises(UsageError, match="nccl needs GPUs"):
        pick_backend("nccl", torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="dist_backend must be one of"):
        TrainConfig(dist_backend="mpi")
