"""Training checkpoints: written atomically by rank 0, read with ``torch.load(weights_only=True)``.

A checkpoint holds the model (encoder + branches), optimiser, LR scheduler and AMP scaler states,
every rank's random generator states (as tensors and plain numbers, so the safe loader reads
them), the data position (the step; see ``sampling.MicroBatchPlan``) and the run's config. Files are
``checkpoints/step_XXXXXXXX.pt``; the newest ``keep`` are kept. ``choose_checkpoint`` picks the one
to resume from and ``check_resumable`` says whether the run's settings let it continue.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Med3DError
from ..files import atomic_write, fsync_dir

__all__ = ["CheckpointError", "FORMAT", "check_resumable", "choose_checkpoint", "find_checkpoints", "load_checkpoint",
           "save_checkpoint", "prune_checkpoints", "rng_state", "set_rng_state", "tasks_digest"]

FORMAT = "med3d_hub.train/1"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(Med3DError, ValueError):
    """A checkpoint cannot be used to resume this run; the message says why."""


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def find_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    path = checkpoint_path(folder, step)
    with atomic_write(path, fsync=True) as f:
        torch.save({"format": FORMAT, "step": step, **state}, f)
    prune_checkpoints(folder, keep)
    return path


def prune_checkpoints(folder: Path, keep: int) -> None:
    found = find_checkpoints(folder)
    for _, path in found[: max(0, len(found) - keep)]:
        path.unlink(missing_ok=True)
    if len(found) > keep:
        fsync_dir(folder)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated by a full disk, not a zip, or not ours
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(err).__name__}: {err})") from err
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{path}: not a med3d_hub.train checkpoint (format {found!r}, expected {FORMAT!r})")
    return state


# -- random generator states as safe-to-load values ---------------------------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# -- resuming -----------------------------------------------------------------------------------

# Settings a resumed run must share with its checkpoint (the rest may change, e.g. steps).
RESUME_KEYS = ("model", "batch_size", "crop", "foreground_prob", "augment", "seed", "optimizer", "momentum",
                "weight_decay", "val_fraction")
# Settings of the learning-rate schedule: when one changes, the schedule is rebuilt from the config.
SCHEDULE_KEYS = ("steps", "lr", "schedule", "warmup_steps", "warmup_lr", "min_lr", "poly_power")
TASK_KEYS = ("name", "num_classes", "channel", "weight", "crop", "intensity")

def tasks_digest(tasks: list) -> str:
    """Which cases train and validate: a resumed run notes when they changed."""
    payload = [[t.name, t.train, t.val] for t in tasks]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def check_resumable(state: dict, cfg, per_step: int, world: int, log, extra_keys=()) -> None:
    """Raise if the run cannot continue; note the settings that changed."""
    old, new = state["config"], cfg.to_dict()
    keys = [k for k in (*RESUME_KEYS, *extra_keys) if k in new]  # a key of another task's section is not compared
    diffs = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new[k]]
    old_tasks = [{k: t.get(k) for k in TASK_KEYS} for t in old.get("tasks", [])]
    new_tasks = [{k: t.get(k) for k in TASK_KEYS} for t in new.get("tasks", [])]
    if old_tasks != new_tasks:
        diffs.append(f"tasks: {old_tasks} -> {new_tasks}")
    old_per_step = state["data"]["micro_batches_per_step"]
    if old_per_step != per_step:
        hint = (f"; with {world} process(es) use --accum-steps {old_per_step // world}"
                if old_per_step % world == 0 else "")
        diffs.append(f"micro-batches per step (processes x accum_steps): {old_per_step} -> {per_step}{hint}")
    if diffs:
        raise CheckpointError(
            "the checkpoint was made with other settings, so resuming would not continue the same run:\n  "
            + "\n  ".join(diffs) + "\nStart a new run in another --output folder, or restore these settings."
        )
    for key in ("grad_clip", "amp", "accum_steps"):
        if old.get(key) != new[key]:
            log(f"note: {key} changed since the checkpoint ({old.get(key)!r} -> {new[key]!r})")
    changed = [key for key in SCHEDULE_KEYS if old.get(key) != new[key]]
    for key in changed:
        log(f"note: {key} changed since the checkpoint ({old.get(key)!r} -> {new[key]!r}); "
            "the learning-rate schedule follows the new value from here on")


def choose_checkpoint(folder: Path, resume: bool | str | None, log) -> Path | None:
    """Which checkpoint to resume from (rank 0), or None to start a new run."""
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: no such checkpoint file")
        return path
    found = find_checkpoints(folder)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if not found:
        if resume:
            log(f"resume: no checkpoint in {folder}; starting a new run")
        return None
    if not resume and not restarted:
        raise CheckpointError(
            f"{folder} already holds checkpoints (latest: {found[-1][1].name}); pass --resume to continue "
            "that run, or choose another --output folder"
        )
    for step, path in reversed(found):  # the newest readable one (writes are atomic; this is belt and braces)
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as err:
            log(f"warning: {err}; trying an older checkpoint")
    raise CheckpointError(f"no readable checkpoint in {folder}")
