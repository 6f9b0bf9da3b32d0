"""Validation: sliding-window inference (MONAI) on whole preprocessed volumes, Dice per class.

The validation cases of all tasks are dealt round-robin to the ranks; each rank predicts its
share with the dataset's own branch, and the per-case Dice values are gathered on every rank.
The numbers therefore do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch

from .data import PreparedTask
from ..inference.distributed import DistContext

__all__ = ["validate"]

# Stitch windows on the GPU only while the class logits of a volume stay below this many values.
_ON_DEVICE_MAX = 2**28


@torch.no_grad()
def validate(model, tasks: list[PreparedTask], ctx: DistContext, *, max_cases: int | None, overlap: float,
             sw_batch_size: int, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
             channels_last: bool = False) -> dict[str, float]:
    """``{"dice/<task>": mean over classes, "dice/<task>/<class>": ..., "dice_mean": ...}``."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import compute_dice

    items = [(t.index, c) for t in tasks for c in t.val[:max_cases]]
    if not items:
        return {}
    was_training = model.training
    model.eval()
    device = ctx.device
    mine = []
    for k in range(ctx.rank, len(items), ctx.world_size):
        t, case_id = items[k]
        task = tasks[t]
        image, label, _ = task.load(case_id)
        x = torch.from_numpy(image)[None, None]
        on_device = device.type == "cpu" or x.numel() * task.num_classes < _ON_DEVICE_MAX
        x = x.to(device if on_device else "cpu")

        def predict(window: torch.Tensor, _t=t) -> torch.Tensor:
            if channels_last:
                window = window.contiguous(memory_format=torch.channels_last_3d)
            with autocast() if autocast else contextlib.nullcontext():
                return model(window, _t).float()

        logits = sliding_window_inference(
            x, roi_size=task.crop, sw_batch_size=sw_batch_size, predictor=predict, overlap=overlap,
            mode="gaussian", sw_device=device, device=x.device,
        )
        pred = logits.argmax(1)[0].to(torch.uint8).cpu()
        del logits
        truth = torch.from_numpy(label)
        # One class at a time as boolean masks: a one-hot of a whole CT volume would not fit.
        dice = [
            float(compute_dice((pred == c)[None, None], (truth == c)[None, None], ignore_empty=True)[0, 0])
            for c in range(1, task.num_classes)
        ]
        mine.append((k, dice))
    if was_training:
        model.train()

    per_case: dict[int, list[float]] = {}
    for part in ctx.all_gather_object(mine):
        per_case.update(dict(part))
    out: dict[str, float] = {}
    task_means = []
    for task in tasks:
        rows = [per_case[k] for k, (t, _) in enumerate(items) if t == task.index]
        if not rows:
            continue
        class_means = []
        for c in range(1, task.num_classes):
            values = [r[c - 1] for r in rows if not math.isnan(r[c - 1])]
            if values:
                mean = float(np.mean(values))
                out[f"dice/{task.name}/{task.class_names[c].replace('/', '_')}"] = round(mean, 5)
                class_means.append(mean)
        if class_means:
            out[f"dice/{task.name}"] = round(float(np.mean(class_means)), 5)
            task_means.append(float(np.mean(class_means)))
    if task_means:
        out["dice_mean"] = round(float(np.mean(task_means)), 5)
    return out
