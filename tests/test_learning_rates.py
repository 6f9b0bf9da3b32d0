"""The learning rate each parameter group actually uses, step by step, against the recipe.

``med3d train``, ``med3d finetune seg`` and ``med3d finetune cls`` run end to end (resnet10, 16^3
crops, a few steps) through ``med3d_hub.cli.app.main``. A global optimiser step hook reads every
group's ``lr`` at the moment ``optimizer.step()`` runs, after the scheduler has set it. The rates
must equal the formula of docs/co-training.md ("Schedule") and docs/transfer.md ("Learning
rates"), written out again below, and ``metrics.jsonl`` must log the same rates.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

pytest.importorskip("monai")
pytest.importorskip("nibabel")
pytest.importorskip("timm")
safetensors = pytest.importorskip("safetensors.torch")

from med3d_hub import create_model  # noqa: E402
from med3d_hub.cli.app import main as med3d  # noqa: E402
from med3d_hub.training.metrics import read_metrics  # noqa: E402
from med3d_hub.training.synthetic import make_synthetic_task  # noqa: E402
from med3d_hub.training.synthetic_classification import make_synthetic_classification  # noqa: E402

COMMON = ["--model", "resnet10", "--crop", "16", "16", "16", "--workers", "0", "--device", "cpu", "-q",
          "--set", "log_every=1", "--set", "val_fraction=0.25", "--set", "val_every=1000"]


def schedule_rate(s: int, *, lr: float, steps: int, warmup_steps: int, warmup_lr: float, min_lr: float,
                  schedule: str, poly_power: float = 0.9) -> float:
    """The schedule's rate for optimiser step s (0-based), as docs/co-training.md writes it."""
    if s < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * s / warmup_steps
    t, length = s - warmup_steps, steps - warmup_steps
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / length)) / 2
    if schedule == "poly":
        return min_lr + (lr - min_lr) * (1 - t / length) ** poly_power
    return lr


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def applied_rates():
    """Per optimiser step: {group name (or index): lr} as the optimiser reads it when it steps."""
    steps: list[dict] = []

    def hook(optimizer, args, kwargs):
        rates = {}
        for i, group in enumerate(optimizer.param_groups):
            key = group.get("name", i)
            assert rates.setdefault(key, group["lr"]) == group["lr"]  # a name's groups share one rate
        steps.append(rates)

    handle = register_optimizer_step_pre_hook(hook)
    yield steps
    handle.remove()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr")
    tasks = [make_synthetic_task(root / "data", f"Synth{i}", num_classes=2, num_cases=4, shape=(20, 24, 20), seed=i)
             for i in (1, 2)]
    csv = make_synthetic_classification(root / "cls", num_cases=8, shape=(16, 18, 16), seed=4, split=True)
    encoder = root / "encoder.safetensors"
    torch.manual_seed(0)
    state = create_model("resnet10", num_classes=0).state_dict()
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(encoder))
    return {"tasks": tasks, "csv": csv, "encoder": encoder, "cache": root / "cache"}


def _logged(out, key: str) -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_cotraining_rate_is_warmup_then_decay(data, tmp_path, applied_rates, schedule):
    recipe = dict(lr=0.1, steps=7, warmup_steps=3, warmup_lr=0.01, min_lr=0.002, schedule=schedule, poly_power=2.0)
    out = tmp_path / "run"
    args = ["train", *[a for t in data["tasks"] for a in ("--data", str(t))], "--steps", "7", "--lr", "0.1",
            "--batch-size", "1", "--output", str(out), "--cache-dir", str(data["cache"]), *COMMON,
            "--set", f"schedule={schedule}", "--set", "warmup_steps=3", "--set", "warmup_lr=0.01",
            "--set", "min_lr=0.002", "--set", "poly_power=2.0"]
    assert med3d(args) == 0
    expected = [schedule_rate(s, **recipe) for s in range(7)]
    assert len(applied_rates) == 7
    for s, rates in enumerate(applied_rates):  # every group (decay / no decay) at the schedule's rate
        assert list(rates.values()) == pytest.approx([expected[s]] * len(rates), rel=1e-9), f"step {s}"
    # the warm-up ends at lr and the decay starts from there: no drop at the end of the warm-up
    assert expected[3] == pytest.approx(0.1) and expected[2] < expected[3]
    assert _logged(out, "lr") == pytest.approx(expected, rel=1e-9)


def test_finetune_seg_encoder_frozen_then_scheduled_new_layers_at_the_multiplier(data, tmp_path, applied_rates):
    # 4 cases, a quarter held out: 3 training cases, 2 crops per step -> 1 epoch = 2 steps, frozen for 2
    recipe = dict(lr=1e-3, steps=6, warmup_steps=2, warmup_lr=1e-4, min_lr=1e-5, schedule="cosine")
    out = tmp_path / "seg"
    args = ["finetune", "seg", "--data", str(data["tasks"][0]), "--pretrained", str(data["encoder"]),
            "--steps", "6", "--batch-size", "2", "--freeze-epochs", "1", "--new-layers-lr-mult", "10",
            "--output", str(out), "--cache-dir", str(data["cache"]), *COMMON,
            "--set", "schedule=cosine", "--set", "warmup_steps=2", "--set", "warmup_lr=0.0001", "--set", "min_lr=0.00001"]
    assert med3d(args) == 0
    base = [schedule_rate(s, **recipe) for s in range(6)]
    encoder = [0.0 if s < 2 else base[s] for s in range(6)]
    new_layers = [10 * b for b in base]
    assert [r["encoder"] for r in applied_rates] == pytest.approx(encoder, rel=1e-9)
    assert [r["new_layers"] for r in applied_rates] == pytest.approx(new_layers, rel=1e-9)
    assert _logged(out, "lr/encoder") == pytest.approx(encoder, rel=1e-9)
    assert _logged(out, "lr/new_layers") == pytest.approx(new_layers, rel=1e-9)
    assert _logged(out, "lr") == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("pretrained", [True, False])
def test_finetune_cls_constant_rate_multiplier_once_scratch_all_at_lr(data, tmp_path, applied_rates, pretrained):
    out = tmp_path / "cls"
    weights = str(data["encoder"]) if pretrained else "none"
    args = ["finetune", "cls", "--csv", str(data["csv"]), "--pretrained", weights, "--steps", "4", "--batch-size", "2",
            "--new-layers-lr-mult", "5", "--output", str(out), "--cache-dir", str(data["cache"]), *COMMON,
            "--set", "warmup_steps=1", "--set", "warmup_lr=0.0001"]
    assert med3d(args) == 0
    lr = 1e-3 if pretrained else 1e-2  # the paper's rates, the defaults
    base = [schedule_rate(s, lr=lr, steps=4, warmup_steps=1, warmup_lr=1e-4, min_lr=0.0, schedule="constant")
            for s in range(4)]
    mult = 5 if pretrained else 1  # from scratch every layer is new: no multiplier
    assert [r["encoder"] for r in applied_rates] == pytest.approx(base, rel=1e-9)
    assert [r["new_layers"] for r in applied_rates] == pytest.approx([mult * b for b in base], rel=1e-9)
    assert _logged(out, "lr/new_layers") == pytest.approx([mult * b for b in base], rel=1e-9)


def test_resumed_finetune_keeps_the_rates_of_an_uninterrupted_run(data, tmp_path, applied_rates):
    recipe = ["--set", "schedule=poly", "--set", "warmup_steps=2", "--set", "keep_checkpoints=2"]
    args = ["finetune", "seg", "--data", str(data["tasks"][0]), "--pretrained", str(data["encoder"]),
            "--batch-size", "2", "--freeze-epochs", "1", "--cache-dir", str(data["cache"]), *COMMON, *recipe]
    assert med3d([*args, "--steps", "5", "--output", str(tmp_path / "whole")]) == 0
    whole = list(applied_rates)
    assert med3d([*args, "--steps", "5", "--set", "checkpoint_every=3", "--output", str(tmp_path / "split")]) == 0
    (tmp_path / "split" / "checkpoints" / "step_00000005.pt").unlink()  # as if stopped after the step-3 checkpoint
    applied_rates.clear()
    assert med3d([*args, "--steps", "5", "--output", str(tmp_path / "split"), "--resume"]) == 0
    assert applied_rates == whole[3:]
