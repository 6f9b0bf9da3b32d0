"""Training checkpoints: written atomically by rank 0, read with ``torch.load(weights_only=True)``.

A checkpoint holds the model (encoder + branches), optimiser, LR scheduler and AMP scaler states,
every rank's random generator states (as tensors and plain numbers, so the safe loader reads
them), the data position (the step; see ``data.MicroBatchPlan``) and the run's config. Files are
``checkpoints/step_XXXXXXXX.pt``; the newest ``keep`` are kept.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Med3DError
from ..files import atomic_write, fsync_dir

__all__ = ["CheckpointError", "FORMAT", "find_checkpoints", "load_checkpoint", "save_checkpoint", "prune_checkpoints",
           "rng_state", "set_rng_state"]

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
