"""Classification validation: accuracy, balanced accuracy, ROC AUC.

Validation volumes are dealt round-robin to the ranks and their class probabilities gathered on
every rank, so the numbers do not depend on the number of processes. ROC AUC is the
Mann-Whitney statistic (ties count one half): for two classes, of the probability of class 1; for
more, the mean of the one-vs-rest AUCs of the classes present in the validation set.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .classification_data import ClsTask
from ..inference.distributed import DistContext

__all__ = ["binary_auc", "classification_scores", "validate_classification"]


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``; NaN when one side is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_scores(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy`` (mean recall over the classes present), ``auc``, ``recall/<class>``."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(1)
    out = {"accuracy": round(float((pred == labels).mean()), 5)}
    recalls = []
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            recall = float((pred[mask] == c).mean())
            recalls.append(recall)
            out[f"recall/{name}"] = round(recall, 5)
    out["balanced_accuracy"] = round(float(np.mean(recalls)), 5)
    if probs.shape[1] == 2:
        auc = binary_auc(probs[:, 1], labels == 1)
    else:
        aucs = [binary_auc(probs[:, c], labels == c) for c in range(probs.shape[1])]
        aucs = [a for a in aucs if not math.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    if not math.isnan(auc):
        out["auc"] = round(auc, 5)
    return out


@torch.no_grad()
def validate_classification(model, task: ClsTask, ctx: DistContext, *, batch_size: int, max_cases: int | None = None,
                            autocast=None, channels_last: bool = False) -> dict[str, float]:
    items = task.val[:max_cases]
    if not items:
        return {}
    was_training = model.training
    model.eval()
    mine = []
    mine_ids = list(range(ctx.rank, len(items), ctx.world_size))
    for start in range(0, len(mine_ids), batch_size):
        ks = mine_ids[start: start + batch_size]
        x = torch.stack([torch.from_numpy(task.load(items[k]))[None] for k in ks]).to(ctx.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(x, 0).float()
        probs = torch.softmax(logits, 1).cpu().numpy()
        mine += [(k, p.tolist()) for k, p in zip(ks, probs)]
    if was_training:
        model.train()
    found: dict[int, list[float]] = {}
    for part in ctx.all_gather_object(mine):
        found.update(dict(part))
    probs = np.array([found[k] for k in range(len(items))])
    labels = np.array([task.labels[c] for c in items])
    out = classification_scores(probs, labels, task.class_names)
    nll = F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(labels))
    out["val_loss"] = round(float(nll), 6)
    return out
