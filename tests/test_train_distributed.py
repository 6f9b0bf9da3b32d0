"""Co-training end to end on CPU: torchrun with 2 gloo processes, resume after SIGKILL, exports.

Two synthetic MSD tasks with 2 and 3 classes, resnet10, 32^3 crops, 16 steps. Each process runs
one torch thread so that two processes fit two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")
safetensors = pytest.importorskip("safetensors.torch")

from med3d_hub import create_model  # noqa: E402
from med3d_hub.training.metrics import read_metrics  # noqa: E402
from med3d_hub.training.synthetic import make_synthetic_task  # noqa: E402

STEPS = 16
TIMEOUT = 240


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cotrain")
    folders = [
        make_synthetic_task(root / "data", "Synth1", num_classes=2, num_cases=6, shape=(36, 40, 36), seed=1),
        make_synthetic_task(root / "data", "Synth2", num_classes=3, num_cases=6, shape=(36, 40, 36), seed=2),
    ]
    args = [a for f in folders for a in ("--data", str(f))] + [
        "--model", "resnet10", "--steps", str(STEPS), "--crop", "32", "32", "32", "--batch-size", "2",
        "--device", "cpu", "--workers", "1", "--cache-dir", str(root / "cache"), "--lr", "0.02",
        "--set", "log_every=2", "--set", "val_every=8", "--set", "checkpoint_every=4", "--set", "keep_checkpoints=2",
        "--set", "warmup_steps=2",
    ]
    return root, args


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _command(nproc: int | None, args: list[str], torchrun_args=()) -> list[str]:
    if nproc is None:
        return [sys.executable, "-m", "med3d_hub.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *torchrun_args, "-m", "med3d_hub.train", *args]


def _run(nproc, args, torchrun_args=(), check=True) -> subprocess.CompletedProcess:
    """Run to the end; on a timeout kill torchrun and its workers (they have their own sessions)."""
    command = _command(nproc, args, torchrun_args)
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"no result after {TIMEOUT} s:\n{err[-6000:]}")
    done = subprocess.CompletedProcess(command, proc.returncode, out, err)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid] + _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _final(out: Path) -> dict:
    return torch.load(out / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.communicate()}"
        if time.monotonic() > deadline:
            _kill_tree(proc)
            pytest.fail(f"no {path} after {TIMEOUT} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted 2-process run."""
    root, args = setup
    out = root / "reference"
    done = _run(2, args + ["--output", str(out)])
    return out, done


def test_two_processes_train_log_checkpoint_and_export(reference):
    out, done = reference
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(2, STEPS + 1, 2))
    for r in train:
        assert {"loss", "loss/Synth1", "loss/Synth2", "lr", "samples_per_s"} <= set(r)
    first, last = [r["loss"] for r in train[:2]], [r["loss"] for r in train[-2:]]
    assert sum(last) < 0.9 * sum(first), [r["loss"] for r in train]  # the loss falls
    assert [r["step"] for r in val] == [8, 16]
    assert {"dice/Synth1", "dice/Synth2", "dice/Synth2/shape1", "dice/Synth2/shape2", "dice_mean"} <= set(val[-1])

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000012.pt", "step_00000016.pt"]  # every 4 steps, the last 2 kept
    state = _final(out)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["data"]["micro_batches_per_step"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "config"} <= set(state)
    assert any((out / "tensorboard").iterdir()) and (out / "curves.png").stat().st_size > 10_000
    assert "2 process(es) on cpu (gloo)" in done.stderr

    encoder = safetensors.load_file(out / "encoder.safetensors")
    backbone = create_model("resnet10", num_classes=0)
    backbone.load_state_dict(encoder, strict=True)
    assert all(torch.equal(v, state["model"][f"encoder.{k}"]) for k, v in encoder.items())
    loaded = create_model("resnet10", pretrained=str(out / "encoder.safetensors"), num_classes=0)
    assert all(torch.equal(v, encoder[k]) for k, v in loaded.state_dict().items())


def test_one_process_with_accumulation_matches_two_processes(setup, reference):
    root, args = setup
    out = root / "single"
    _run(None, args + ["--output", str(out), "--accum-steps", "2"])
    ref, mine = _final(reference[0]), _final(out)
    for key, value in ref["model"].items():
        torch.testing.assert_close(mine["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses = lambda o: [r["loss"] for r in read_metrics(o / "metrics.jsonl") if r["kind"] == "train"]  # noqa: E731
    assert losses(out) == pytest.approx(losses(reference[0]), rel=1e-5)


def _assert_same_run(out: Path, reference_out: Path) -> None:
    ref, mine = _final(reference_out), _final(out)
    assert set(mine["model"]) == set(ref["model"])
    for key, value in ref["model"].items():
        assert torch.equal(mine["model"][key], value), key  # bitwise
    for pid, value in ref["optimizer"]["state"].items():
        assert torch.equal(mine["optimizer"]["state"][pid]["momentum_buffer"], value["momentum_buffer"])
    steps = [(r["kind"], r["step"]) for r in read_metrics(out / "metrics.jsonl")]
    assert len(steps) == len(set(steps))  # nothing logged twice
    loss = lambda o: [(r["step"], r["loss"]) for r in read_metrics(o / "metrics.jsonl") if r["kind"] == "train"]  # noqa: E731
    assert loss(out) == loss(reference_out)


def test_sigkill_then_resume_gives_the_same_weights(setup, reference):
    root, args = setup
    out = root / "killed"
    proc = subprocess.Popen(_command(2, args + ["--output", str(out)]), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(out / "checkpoints" / "step_00000004.pt", proc)
    _kill_tree(proc)  # torchrun and its workers (they have their own sessions)
    proc.wait(timeout=30)
    assert not (out / "checkpoints" / f"step_{STEPS:08d}.pt").exists(), "the run ended before it was killed"
    assert not (out / "encoder.safetensors").exists()

    done = _run(2, args + ["--output", str(out), "--resume"])
    assert f"resume: {out / 'checkpoints'}" in done.stderr
    _assert_same_run(out, reference[0])


def test_without_resume_a_used_folder_is_refused(setup, reference):
    root, args = setup
    done = _run(None, args + ["--output", str(reference[0])], check=False)
    assert done.returncode == 2 and "pass --resume" in done.stderr


def test_resuming_with_another_global_batch_is_refused(setup, reference):
    root, args = setup
    done = _run(None, args + ["--output", str(reference[0]), "--resume"], check=False)
    assert done.returncode == 2
    assert "micro-batches per step (processes x accum_steps): 2 -> 1" in done.stderr
    assert "use --accum-steps 2" in done.stderr


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_worker_is_killed(setup, reference):
    root, args = setup
    out = root / "restarted"
    proc = subprocess.Popen(_command(2, args + ["--output", str(out)], ["--max-restarts=1"]), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for(out / "checkpoints" / "step_00000004.pt", proc)
    workers = _children()[proc.pid]  # the training processes; their loader workers are one level down
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish after the restart:\n" + output[-8000:])
    assert proc.returncode == 0, output[-8000:]
    assert "resume:" in output
    _assert_same_run(out, reference[0])


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes(setup, reference):
    root, args = setup
    out = root / "terminated"
    proc = subprocess.Popen(_command(None, args + ["--output", str(out), "--accum-steps", "2"]), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "step_00000004.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = max(int(p.stem[5:]) for p in (out / "checkpoints").iterdir())
    assert 4 <= stopped < STEPS and f"stopped by signal 15 after step {stopped}" in err
    _run(None, args + ["--output", str(out), "--accum-steps", "2", "--resume"])
    ref, mine = _final(reference[0]), _final(out)
    for key, value in ref["model"].items():
        torch.testing.assert_close(mine["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
