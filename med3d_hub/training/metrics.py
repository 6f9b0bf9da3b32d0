"""What a run reports: ``metrics.jsonl``, TensorBoard events and ``curves.png`` (rank 0 only).

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "loss",
"loss/<task>", "lr", "samples_per_s", "time"}`` for logged training steps (averages over the
steps since the previous line) and ``{"kind": "val", "step", "dice/<task>", "dice/<task>/<class>",
"dice_mean"}`` after each validation. On resume the lines after the checkpoint's step are
dropped (and TensorBoard purges its events after that step), so the files describe exactly one
history.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

from ..files import atomic_write

__all__ = ["MetricsLogger", "plot_curves", "read_metrics"]


def read_metrics(path: Path) -> list[dict]:
    """The complete records of a ``metrics.jsonl`` (a line cut short by a kill is ignored)."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.png = Path(out_dir) / "curves.png"
        self.records: list[dict] = []
        self.writer = None
        if not enabled:
            return
        self.records = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        with atomic_write(self.path, "w") as f:  # drop what came after the checkpoint we resume from
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed; no TensorBoard logs (pip install tensorboard)", stacklevel=2)
            else:
                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            prefix = "val/" if record.get("kind") == "val" else "train/"
            for key, value in record.items():
                if key not in ("step", "time", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(prefix + key, value, record["step"])
            self.writer.flush()

    def plot(self) -> None:
        if self.enabled:
            plot_curves(self.records, self.png)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# Validation scores drawn on the right-hand panel besides the Dice of each task (classification).
_SCORES = ("accuracy", "balanced_accuracy", "auc")


def plot_curves(records: list[dict], path: Path) -> None:
    """The run's curves as one PNG: the training loss (total and per task) with the validation loss
    when there is one, and the validation scores (Dice per task, or accuracy, balanced accuracy, AUC)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig = Figure(figsize=(11, 4), dpi=100)
    ax_loss, ax_val = fig.subplots(1, 2)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="black", lw=1.5, label="train")
    for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
        ax_loss.plot(*_series(train, key), lw=1, label=key.split("/", 1)[1])
    if any("val_loss" in r for r in val):
        ax_loss.plot(*_series(val, "val_loss"), marker="o", lw=1, label="validation")
    ax_loss.set(title="loss", xlabel="step", ylabel="loss")
    dice = sorted({k for r in val for k in r if k.startswith("dice/") and k.count("/") == 1})
    for key in dice + [k for k in _SCORES if any(k in r for r in val)]:
        ax_val.plot(*_series(val, key), marker="o", lw=1, label=key.split("/", 1)[-1].replace("_", " "))
    ax_val.set(title="validation Dice (foreground classes)" if dice else "validation", xlabel="step",
               ylabel="Dice" if dice else "score", ylim=(0, 1))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]
