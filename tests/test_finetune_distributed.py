"""Fine-tuning under torchrun (2 gloo processes on CPU) computes what one process with 2 accumulation steps does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("monai")
safetensors = pytest.importorskip("safetensors.torch")

from med3d_hub.training.metrics import read_metrics  # noqa: E402
from med3d_hub.training.synthetic import make_synthetic_task  # noqa: E402
from med3d_hub.training.synthetic_classification import make_synthetic_classification  # noqa: E402

TIMEOUT = 300


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(args: list[str], nproc: int | None) -> None:
    prefix = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run([*prefix, "-m", "med3d_hub.finetune", *args], env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seg", "cls"])
def test_two_processes_match_one_process_with_accumulation(kind, tmp_path):
    if kind == "seg":
        folder = make_synthetic_task(tmp_path / "data", "Synth", num_classes=2, num_cases=5, shape=(20, 24, 20), seed=5)
        data = ["--data", str(folder), "--set", "val_fraction=0.2"]
    else:
        data = ["--csv", str(make_synthetic_classification(tmp_path / "cls", num_cases=10, shape=(16, 16, 16), split=True)),
                "--class-weights", "balanced"]
    common = [kind, *data, "--model", "resnet10", "--pretrained", "none", "--crop", "16", "16", "16", "--steps", "4",
              "--batch-size", "2", "--val-every", "2", "--freeze-epochs", "1", "--workers", "0", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache"), "--set", "log_every=1", "--set", "augment=false"]
    _run([*common, "--output", str(tmp_path / "ddp")], nproc=2)
    _run([*common, "--output", str(tmp_path / "one"), "--accum-steps", "2"], nproc=None)
    a = safetensors.load_file(str(tmp_path / "ddp" / "finetuned.safetensors"))
    b = safetensors.load_file(str(tmp_path / "one" / "finetuned.safetensors"))
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4), key
    val = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
