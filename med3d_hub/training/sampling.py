"""Sampling: which task each micro-batch draws from, and the crops of a segmentation micro-batch.

The run is a sequence of micro-batches, each holding ``batch_size`` crops (or volumes) of a single
task. Micro-batch ``g`` of the whole run belongs to the task at position ``g`` of a stream of
shuffled cycles (each cycle lists task ``t`` ``weight_t`` times), and its crops are drawn from a
random generator seeded by ``(seed, g, j)``. What a micro-batch holds is therefore a function of
its index alone: independent of the number of processes and loader workers, and the data
position of a checkpoint is just its step number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["CropDataset", "MicroBatchPlan", "MicroBatchSampler", "collate", "crop_box", "read_crop"]


class MicroBatchPlan:
    """Which task each micro-batch of the run draws from; a pure function of the index.

    Micro-batch ``g`` of step ``s`` is ``s * per_step + m`` for ``m`` in ``range(per_step)``,
    ``per_step = world_size * accum_steps``; rank ``r`` runs ``m = r * accum_steps + i``.
    """

    def __init__(self, weights: Sequence[int], seed: int, per_step: int):
        self.cycle = np.repeat(np.arange(len(weights)), weights)
        self.seed = seed
        self.per_step = per_step

    def task_of(self, g: int) -> int:
        cycle, pos = divmod(g, len(self.cycle))
        order = np.random.default_rng([self.seed, 1, cycle]).permutation(len(self.cycle))
        return int(self.cycle[order[pos]])

    def rank_micro_batches(self, step: int, rank: int, accum_steps: int) -> list[int]:
        first = step * self.per_step + rank * accum_steps
        return list(range(first, first + accum_steps))


class MicroBatchSampler:
    """Yields ``[(g, 0), ..., (g, batch_size - 1)]`` for this rank's micro-batches from ``start_step``."""

    def __init__(self, plan: MicroBatchPlan, start_step: int, steps: int, rank: int, accum_steps: int, batch_size: int):
        self.plan, self.start, self.steps = plan, start_step, steps
        self.rank, self.accum, self.batch_size = rank, accum_steps, batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.steps):
            for g in self.plan.rank_micro_batches(step, self.rank, self.accum):
                yield [(g, j) for j in range(self.batch_size)]


def crop_box(shape: Sequence[int], crop: Sequence[int], rng: np.random.Generator, centre=None) -> list[int]:
    """Start corner of a crop: uniform, or around ``centre``; axes shorter than the crop are centred."""
    starts = []
    for axis, (n, s) in enumerate(zip(shape, crop)):
        if n <= s:
            starts.append((n - s) // 2)
        elif centre is None:
            starts.append(int(rng.integers(0, n - s + 1)))
        else:
            starts.append(int(np.clip(int(centre[axis]) - s // 2, 0, n - s)))
    return starts


def read_crop(array: np.ndarray, start: Sequence[int], crop: Sequence[int]) -> np.ndarray:
    """``array[start:start+crop]`` with zeros outside the volume (reads only the crop from a memmap)."""
    out = np.zeros(tuple(crop), dtype=array.dtype)
    src, dst = [], []
    for st, s, n in zip(start, crop, array.shape):
        lo, hi = max(st, 0), min(st + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _augmentations():
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "label"]
    return Compose(
        [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
        + [
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            RandGaussianNoised("image", prob=0.15, mean=0.0, std=0.1),
        ]
    )


def _plain_tensor(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class CropDataset(torch.utils.data.Dataset):
    """Item ``(g, j)``: crop ``j`` of micro-batch ``g``, as (1, D, H, W) image and label tensors.

    With probability ``foreground_prob`` the crop is centred on a voxel of a foreground class
    present in the case (each present class equally likely, so small structures are seen);
    otherwise its position is uniform. Flips on all axes and mild intensity scale, shift and
    noise (MONAI) follow when ``augment`` is on.
    """

    def __init__(self, tasks: list, plan: MicroBatchPlan, seed: int, foreground_prob: float, augment: bool):
        self.tasks, self.plan, self.seed = tasks, plan, seed
        self.foreground_prob = foreground_prob
        self.transform = _augmentations() if augment else None

    def __getitem__(self, key: tuple[int, int]) -> dict:
        g, j = key
        task = self.tasks[self.plan.task_of(g)]
        rng = np.random.default_rng([self.seed, 2, g, j])
        case_id = task.train[int(rng.integers(len(task.train)))]
        image, label, fg = task.load(case_id, mmap=True)
        centre = None
        if len(fg) and rng.random() < self.foreground_prob:
            classes = np.unique(fg[:, 0])
            points = fg[fg[:, 0] == rng.choice(classes)]
            centre = points[int(rng.integers(len(points))), 1:]
        start = crop_box(image.shape, task.crop, rng, centre)
        sample = {
            "image": torch.from_numpy(read_crop(image, start, task.crop))[None],
            "label": torch.from_numpy(read_crop(label, start, task.crop))[None],
        }
        if self.transform is not None:
            self.transform.set_random_state(seed=int(rng.integers(2**31)))
            sample = {k: _plain_tensor(v) for k, v in self.transform(sample).items()}
        sample["task"] = task.index
        return sample


def collate(samples: list[dict]) -> dict:
    tasks = {s["task"] for s in samples}
    if len(tasks) != 1:
        raise RuntimeError(f"a micro-batch mixes tasks {sorted(tasks)}")
    return {
        "image": torch.stack([s["image"] for s in samples]).contiguous(),
        "label": torch.stack([s["label"] for s in samples]).contiguous(),
        "task": tasks.pop(),
    }
