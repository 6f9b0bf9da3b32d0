"""Compare training runs: validation metric against step and wall time, and steps-to-target.

    med3d compare runs/liver runs/liver-scratch                 # compare.png + a table
    table = compare_runs(["runs/a", "runs/b"], metric="dice_mean", target=0.9)

A run is any folder with a ``metrics.jsonl`` (co-training, fine-tuning, or an exported model
folder). The metric defaults to ``dice_mean`` when every run has it, else ``accuracy``.

**Steps-to-target** is how the paper's "converges 2x / 10x faster" is read: the target is
``target`` (default 0.9) times the best *final* value among the runs (the value of each run's last
validation), and a run's steps-to-target is the first validated step whose value reaches it (so
it is only as fine as ``val_every``). ``speed-up`` divides the last-listed run's steps-to-target
(the baseline, e.g. from scratch) by each run's; when the baseline never reaches the target, its
last validated step is used and the speed-up is a lower bound (shown with ``>=``).

**Wall time** is the time since the run's start: the first logged training record's time minus
the time its steps took at the rate of the first logged interval. Time spent stopped between a
kill and a resume counts too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..errors import Med3DError

__all__ = ["CompareError", "RunCurve", "compare_runs", "format_table", "plot_comparison", "read_curve"]

DEFAULT_METRICS = ("dice_mean", "accuracy")


class CompareError(Med3DError, ValueError):
    """A run cannot be compared; the message names the folder."""


@dataclass
class RunCurve:
    label: str
    path: str
    steps: list[int]
    values: list[float]
    seconds: list[float]
    final: float | None = None
    best: float | None = None
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    last_step: int | None = None
    speedup: float | None = None
    speedup_lower_bound: bool = False


def _records(folder: Path) -> list[dict]:
    from ..training.metrics import read_metrics

    path = folder / "metrics.jsonl"
    if not folder.is_dir():
        raise CompareError(f"{folder}: no such run folder")
    if not path.is_file():
        raise CompareError(f"{folder}: no metrics.jsonl (a run of `med3d train` or `med3d finetune` writes one)")
    return read_metrics(path)


def _start_time(records: list[dict]) -> float | None:
    train = [r for r in records if r.get("kind") == "train" and isinstance(r.get("time"), (int, float))]
    if not train:
        timed = [r for r in records if isinstance(r.get("time"), (int, float))]
        return min(r["time"] for r in timed) if timed else None
    first = train[0]
    if len(train) > 1 and train[1]["step"] > first["step"]:
        per_step = (train[1]["time"] - first["time"]) / (train[1]["step"] - first["step"])
        return first["time"] - max(per_step, 0.0) * first["step"]
    return first["time"]


def read_curve(folder: str | os.PathLike, metric: str, label: str | None = None) -> RunCurve:
    """The validation values of ``metric`` in a run, with their steps and seconds since the start."""
    folder = Path(folder).expanduser()
    records = _records(folder)
    val = [r for r in records if r.get("kind") == "val" and isinstance(r.get(metric), (int, float))
           and math.isfinite(r[metric])]
    if not val:
        found = sorted({k for r in records if r.get("kind") == "val" for k in r if k not in ("kind", "step", "time")})
        hint = f"; its validation records hold: {', '.join(found)}" if found else "; it has no validation record yet"
        raise CompareError(f"{folder}: no validation values of {metric!r}{hint}")
    start = _start_time(records)
    seconds = [float(r["time"] - start) if start is not None and "time" in r else float("nan") for r in val]
    return RunCurve(label or folder.name, str(folder), [int(r["step"]) for r in val], [float(r[metric]) for r in val],
                    seconds)


def _default_metric(folders: Sequence[Path]) -> str:
    for metric in DEFAULT_METRICS:
        if all(any(r.get("kind") == "val" and metric in r for r in _records(f)) for f in folders):
            return metric
    raise CompareError("the runs share neither dice_mean nor accuracy; name the metric with --metric")


def compare_runs(runs: Sequence[str | os.PathLike], metric: str | None = None, target: float = 0.9,
                 labels: Sequence[str] | None = None) -> tuple[str, float, list[RunCurve]]:
    """``(metric, target value, curves)``, each curve with its final, best and steps-to-target."""
    if not runs:
        raise CompareError("give at least one run folder")
    if not 0 < target <= 1:
        raise CompareError(f"target must be a fraction in (0, 1], got {target}")
    folders = [Path(r).expanduser() for r in runs]
    if labels is not None and len(labels) != len(folders):
        raise CompareError(f"{len(labels)} label(s) for {len(folders)} run(s)")
    metric = metric or _default_metric(folders)
    names = list(labels) if labels else _unique_labels(folders)
    curves = [read_curve(f, metric, name) for f, name in zip(folders, names)]
    for c in curves:
        c.final, c.best, c.last_step = c.values[-1], max(c.values), c.steps[-1]
    goal = target * max(c.final for c in curves)
    for c in curves:
        hit = next((i for i, v in enumerate(c.values) if v >= goal), None)
        if hit is not None:
            c.steps_to_target, c.seconds_to_target = c.steps[hit], c.seconds[hit]
    base = curves[-1]
    base_steps = base.steps_to_target if base.steps_to_target is not None else base.last_step
    for c in curves:
        if c.steps_to_target:
            c.speedup = base_steps / c.steps_to_target
            c.speedup_lower_bound = base.steps_to_target is None
    return metric, goal, curves


def _unique_labels(folders: Sequence[Path]) -> list[str]:
    names = [f.name for f in folders]
    if len(set(names)) == len(names):
        return names
    return [str(f) for f in folders]


def format_table(metric: str, goal: float, curves: list[RunCurve], target: float = 0.9) -> str:
    """A Markdown table: final, best, steps and seconds to the target, speed-up against the last run."""
    base = curves[-1].label
    lines = [f"target: {metric} >= {goal:.4f} ({target:g} x the best final value)", "",
             f"| run | final {metric} | best | last step | steps to target | time to target | speed-up vs {base} |",
             "|---|---|---|---|---|---|---|"]
    for c in curves:
        steps = str(c.steps_to_target) if c.steps_to_target is not None else f"not reached (> {c.last_step})"
        secs = _duration(c.seconds_to_target) if c.steps_to_target is not None else "-"
        speed = "-" if c.speedup is None else (">= " if c.speedup_lower_bound else "") + f"{c.speedup:.2f}x"
        lines.append(f"| {c.label} | {c.final:.4f} | {c.best:.4f} | {c.last_step} | {steps} | {secs} | {speed} |")
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def plot_comparison(metric: str, goal: float, curves: list[RunCurve], path: str | os.PathLike) -> Path:
    """Two panels, the metric against step and against wall time, with the target as a line."""
    from matplotlib.figure import Figure

    from ..files import atomic_write

    fig = Figure(figsize=(11, 4.2), dpi=100)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for c in curves:
        line, = by_step.plot(c.steps, c.values, marker="o", ms=3, lw=1.3, label=c.label)
        minutes = [s / 60 for s in c.seconds]
        by_time.plot(minutes, c.values, marker="o", ms=3, lw=1.3, color=line.get_color(), label=c.label)
        if c.steps_to_target is not None:
            by_step.axvline(c.steps_to_target, color=line.get_color(), lw=0.8, ls=":")
    for ax, xlabel in ((by_step, "step"), (by_time, "wall time (min)")):
        ax.axhline(goal, color="grey", lw=0.8, ls="--", label="target" if ax is by_step else None)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    by_step.set(ylabel=f"validation {metric}", title=f"validation {metric} vs step")
    by_time.set(title=f"validation {metric} vs wall time")
    by_step.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    return path


def as_json(metric: str, goal: float, curves: list[RunCurve]) -> str:
    return json.dumps({"metric": metric, "target_value": goal, "runs": [asdict(c) for c in curves]}, indent=1)
