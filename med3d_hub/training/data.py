"""MSD tasks for co-training: find the cases, check every one, preprocess once, sample crops.

Layout read: the Medical Segmentation Decathlon's ``TaskXX_Name/dataset.json``, ``imagesTr/``,
``labelsTr/`` (NIfTI). Volumes are read with ``med3d_hub.data.io`` and so share its axis convention:
arrays are (D, H, W) = (inferior->superior, posterior->anterior, left->right), whatever the
orientation stored in the file; image and label go through the same reorientation.

Preprocessing (the paper's): resample each volume to the median voxel spacing of its dataset,
clip to the volume's 0.5-99.5 percentiles and z-score, with ``med3d_hub.data.preprocess.Preprocess``;
labels are resampled to the same grid by nearest neighbour. The result is cached on disk as
``.npy`` files (read back memory-mapped, so a crop reads only its own voxels) beside the sampled
foreground locations of every class. A cache entry is keyed by the source files (path, size,
modification time) and the settings (target spacing, intensity method, channel), and is rebuilt
when either changes.

Work is shared between ranks: case ``k`` of the run is checked and preprocessed by rank
``k % world_size``; every rank then sees the same list of good cases and the same median
spacings, so all ranks agree on what is skipped or wrong.

Sampling: the run is a sequence of micro-batches, each holding ``batch_size`` crops of a single
task. Micro-batch ``g`` of the whole run belongs to the task at position ``g`` of a stream of
shuffled cycles (each cycle lists task ``t`` ``weight_t`` times), and its crops are drawn from a
random generator seeded by ``(seed, g, j)``. What a micro-batch holds is therefore a function of
its index alone: independent of the number of processes and loader workers, and the data
position of a checkpoint is just its step number.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.io import Volume, VolumeReadError, read_volume
from ..data.preprocess import PAPER_PREPROCESS, Preprocess
from ..errors import Med3DError
from ..files import atomic_write, read_json
from .config import ConfigError, RunConfig, SegmentationSection, TaskConfig
from .distributed import DistContext

__all__ = [
    "BadCaseWarning", "Case", "CropDataset", "DataError", "MicroBatchPlan", "PreparedTask",
    "default_cache_dir", "discover_cases", "prepare_tasks",
]

# Bump when the cached arrays would change for the same files and settings.
CACHE_VERSION = 1
# Foreground voxels kept per class and case for oversampling (a uniform sample of them).
FG_SAMPLES_PER_CLASS = 10_000
_NIFTI = (".nii.gz", ".nii")


class DataError(Med3DError, ValueError):
    """A task folder or case cannot be used; the message names the file."""


class BadCaseWarning(UserWarning):
    """A case skipped because of ``--skip-bad-cases``."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path


@dataclass
class PreparedTask:
    """A task ready to sample: its preprocessed cases, split into training and validation."""

    index: int
    name: str
    num_classes: int
    class_names: list[str]
    crop: tuple[int, int, int]
    spacing: tuple[float, float, float]
    folder: Path
    weight: int
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def array_path(self, case_id: str, kind: str) -> Path:
        return self.folder / f"{case_id}.{kind}.npy"

    def load(self, case_id: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Preprocessed image (D, H, W) float32, label (D, H, W) uint8, foreground (N, 4) int32."""
        mode = "r" if mmap else None
        return (
            np.load(self.array_path(case_id, "image"), mmap_mode=mode, allow_pickle=False),
            np.load(self.array_path(case_id, "label"), mmap_mode=mode, allow_pickle=False),
            np.load(self.array_path(case_id, "fg"), allow_pickle=False),
        )


def default_cache_dir() -> Path:
    """The ``train/`` folder of the package's one cache root (``$MED3D_HUB_CACHE``, else ``$HF_HOME/med3d_hub``)."""
    from ..weights.hub import cache_root

    return cache_root() / "train"


# -- task folders ------------------------------------------------------------------------------

def read_dataset_json(folder: Path) -> dict:
    path = folder / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); restore the file from the task archive") from err
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _case_id(path: Path) -> str:
    name = path.name
    for ext in _NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def discover_cases(folder: Path, meta: dict | None = None) -> list[Case]:
    """The labelled cases of an MSD task: ``dataset.json``'s ``training`` list, else ``imagesTr/``."""
    folder = Path(folder)
    meta = read_dataset_json(folder) if meta is None else meta
    entries = meta.get("training")
    cases: list[Case] = []
    if isinstance(entries, list) and entries:
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise DataError(f"{folder / 'dataset.json'}: training[{i}] needs 'image' and 'label' paths, got {entry!r}")
            image, label = folder / entry["image"], folder / entry["label"]
            cases.append(Case(_case_id(image), image.resolve(), label.resolve()))
    else:
        images = folder / "imagesTr"
        if not images.is_dir():
            raise DataError(
                f"{folder}: not an MSD task folder (no dataset.json training list and no imagesTr/); "
                "expected TaskXX_Name/ with dataset.json, imagesTr/ and labelsTr/"
            )
        for image in sorted(images.iterdir()):
            if image.name.startswith(".") or not image.name.endswith(_NIFTI):
                continue  # hidden files such as macOS '._' companions in some archives
            cases.append(Case(_case_id(image), image.resolve(), (folder / "labelsTr" / image.name).resolve()))
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"{folder}: case names must be unique, repeated: {', '.join(dupes[:10])}")
    if not cases:
        raise DataError(f"{folder}: no training cases found (dataset.json lists none and imagesTr/ is empty)")
    return cases


def _task_classes(task: TaskConfig, meta: dict, folder: Path) -> tuple[int, list[str]]:
    labels = meta.get("labels")
    names: list[str] = []
    if isinstance(labels, dict) and labels:
        try:
            names = [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]
        except (TypeError, ValueError):
            raise DataError(f"{folder / 'dataset.json'}: 'labels' keys must be integers, got {list(labels)}") from None
    if task.num_classes is None:
        if not names:
            where = (f"{folder / 'dataset.json'} has no 'labels'" if (folder / "dataset.json").is_file()
                     else f"{folder} has no dataset.json to take the labels from")
            raise DataError(
                f"task {task.name!r}: num_classes is not set and {where}; "
                "set num_classes (background included) for this task"
            )
        return len(names), names
    if names and len(names) != task.num_classes:
        raise DataError(
            f"task {task.name!r}: num_classes={task.num_classes} but {folder / 'dataset.json'} lists "
            f"{len(names)} labels ({names}); fix one of them"
        )
    return task.num_classes, names or [str(i) for i in range(task.num_classes)]


def _task_channel(task: TaskConfig, meta: dict, folder: Path) -> int | None:
    modality = meta.get("modality")
    count = len(modality) if isinstance(modality, dict) else 1
    if count > 1 and task.channel is None:
        listing = ", ".join(f"{k}: {v}" for k, v in modality.items())
        raise DataError(
            f"task {task.name!r}: the images have {count} channels ({listing}) but Med3D takes one; "
            f"set `channel:` for this task in the config"
        )
    if task.channel is not None and task.channel >= count and isinstance(modality, dict):
        raise DataError(f"task {task.name!r}: channel {task.channel} does not exist, {folder} has {count} channel(s)")
    return task.channel


# -- reading and checking one case ----------------------------------------------------------------

def _read_image(path: Path, channel: int | None) -> Volume:
    return read_volume(path, channel=channel)


def _fingerprint(case: Case) -> list:
    out: list = []
    for path in (case.image, case.label):
        st = path.stat()
        out += [str(path), st.st_size, st.st_mtime_ns]
    return out


def _inspect(case: Case, num_classes: int, channel: int | None) -> dict:
    """Read a case and check it; returns its shape and spacing, or the error naming the file."""
    for what, path in (("image", case.image), ("label", case.label)):
        if not path.is_file():
            return {"error": f"{path}: {what} file not found"}
    try:
        image = _read_image(case.image, channel)
        label = read_volume(case.label)
    except (VolumeReadError, OSError) as err:
        return {"error": str(err)}
    if image.shape != label.shape:
        return {"error": f"{case.label}: label shape {label.shape} differs from image shape {image.shape} ({case.image})"}
    if not np.allclose(image.spacing, label.spacing, rtol=1e-2):
        return {"error": f"{case.label}: voxel spacing {label.spacing} differs from the image's {image.spacing} ({case.image})"}
    if not all(np.isfinite(s) and s > 0 for s in image.spacing):
        return {"error": f"{case.image}: invalid voxel spacing {image.spacing}"}
    if image.array.dtype.kind == "f" and not np.isfinite(image.array).all():
        return {"error": f"{case.image}: image holds NaN or infinite values"}
    lab = label.array
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
        return {"error": f"{case.label}: label values must be integers"}
    low, high = lab.min(), lab.max()
    if low < 0 or high >= num_classes:
        bad = np.unique(lab[(lab < 0) | (lab >= num_classes)])[:10]
        return {
            "error": f"{case.label}: label value(s) {[int(v) for v in bad]} outside 0..{num_classes - 1} "
            f"(the task has {num_classes} classes, background included)"
        }
    return {"error": None, "shape": list(image.shape), "spacing": [float(s) for s in image.spacing]}


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def _inspect_cached(case: Case, num_classes: int, channel: int | None, folder: Path) -> dict:
    record_path = folder / "inspect" / f"{case.case_id}.json"
    try:
        fingerprint = _fingerprint(case)
    except OSError:
        return _inspect(case, num_classes, channel)  # a missing file: reported, nothing cached
    key = {"version": CACHE_VERSION, "fingerprint": fingerprint, "num_classes": num_classes, "channel": channel}
    cached = read_json(record_path)
    if cached is not None and cached.get("key") == key:
        return cached["result"]
    result = _inspect(case, num_classes, channel)
    _write_json(record_path, {"key": key, "result": result})
    return result


def _preprocess(case: Case, channel: int | None, pre: Preprocess, out: Path, key: dict) -> None:
    """Resample, clip and z-score one case; write its arrays and then its metadata (the commit)."""
    meta_path = out / f"{case.case_id}.json"
    meta_path.unlink(missing_ok=True)  # the arrays below no longer match an older record
    image = pre(_read_image(case.image, channel))[0]
    label = torch.from_numpy(np.ascontiguousarray(read_volume(case.label).array).astype(np.uint8))
    if tuple(label.shape) != tuple(image.shape):
        label = F.interpolate(label[None, None], size=tuple(image.shape), mode="nearest-exact")[0, 0]
    label_np = label.numpy()
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    parts = []
    for cls in range(1, int(label_np.max()) + 1):
        flat = np.flatnonzero(label_np == cls)
        if flat.size == 0:
            continue
        if flat.size > FG_SAMPLES_PER_CLASS:
            flat = np.sort(rng.choice(flat, FG_SAMPLES_PER_CLASS, replace=False))
        coords = np.stack(np.unravel_index(flat, label_np.shape), axis=1)
        parts.append(np.concatenate([np.full((len(coords), 1), cls), coords], axis=1))
    fg = np.concatenate(parts).astype(np.int32) if parts else np.zeros((0, 4), np.int32)
    save_case(out, case.case_id, dict(zip(SEG_ARRAYS, (image.numpy(), label_np, fg))), {"key": key, "shape": list(image.shape)})


# -- the preprocessing cache, shared with classification_data ---------------------------------------
# A case is `<case_id>.json` ({"key": ...}, written last: the commit) beside its arrays.

SEG_ARRAYS = (".image.npy", ".label.npy", ".fg.npy")


def is_cached(folder: Path, case_id: str, key: dict, arrays: tuple[str, ...] = SEG_ARRAYS) -> bool:
    """True when the case's record has this key and every one of its arrays is there."""
    meta = read_json(folder / f"{case_id}.json")
    return meta is not None and meta.get("key") == key and all((folder / f"{case_id}{a}").is_file() for a in arrays)


def save_case(folder: Path, case_id: str, arrays: dict[str, np.ndarray], record: dict) -> None:
    """Write a case's arrays, then its record (the commit): a reader sees a whole case or none."""
    for suffix, array in arrays.items():
        _save_npy(folder / f"{case_id}{suffix}", array)
    _write_json(folder / f"{case_id}.json", record)


def fill_everywhere(ctx: DistContext, count: int, fill: Callable[[Iterable[int]], dict[int, str]]) -> dict[int, str]:
    """Run ``fill(indices) -> {index: error}`` over ``range(count)`` on every rank; the failures of all.

    Each rank fills its share first, then what it still lacks (ranks on other nodes may not share the
    cache folder), so that every rank ends with a complete cache and the same list of failures.
    """
    failures: dict[int, str] = {}
    for part in ctx.all_gather_object(fill(range(ctx.rank, count, ctx.world_size))):
        failures.update(part)
    failures.update(fill(k for k in range(count) if k not in failures))
    merged: dict[int, str] = {}
    for part in ctx.all_gather_object(failures):
        merged.update(part)
    return merged


# -- the whole run -----------------------------------------------------------------------------

@dataclass
class _TaskPlan:
    task: TaskConfig
    folder: Path
    cache: Path
    num_classes: int
    class_names: list[str]
    channel: int | None
    intensity: dict
    cases: list[Case]


def _plan_task(cfg: SegmentationSection | RunConfig, task: TaskConfig, cache_root: Path) -> _TaskPlan:
    folder = cfg.task_path(task)
    if not folder.is_dir():
        raise DataError(
            f"task {task.name!r}: folder {folder} not found; download the task (see the config's notes) "
            "and point `path`/`data_root` or --data at it"
        )
    meta = read_dataset_json(folder)
    cases = discover_cases(folder, meta)  # first: a folder that is no MSD task is told so, before its labels
    num_classes, names = _task_classes(task, meta, folder)
    channel = _task_channel(task, meta, folder)
    try:
        intensity = Preprocess(intensity=task.intensity or PAPER_PREPROCESS["intensity"]).intensity
    except ValueError as err:
        raise ConfigError(f"task {task.name!r}: intensity: {err}") from err
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
    cache = cache_root / f"{task.name}-{digest}"
    return _TaskPlan(task, folder, cache, num_classes, names, channel, intensity, cases)


def _report_bad(bad: list[tuple[str, str]], skip: bool) -> None:
    if not bad:
        return
    if skip:
        for task, error in bad:
            warnings.warn(f"skipping a bad case of task {task!r}: {error}", BadCaseWarning, stacklevel=3)
        return
    shown = "\n".join(f"  [{task}] {error}" for task, error in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    raise DataError(
        f"{len(bad)} bad case(s) found while checking the data:\n{shown}{more}\n"
        "Fix or remove these files, or pass --skip-bad-cases to train without them."
    )


def _split(case_ids: list[str], fraction: float, seed: int, task_index: int) -> tuple[list[str], list[str]]:
    """A seeded split; at least one validation case when the fraction is > 0 and there are two or more."""
    if fraction <= 0 or len(case_ids) < 2:
        return list(case_ids), []
    n_val = min(len(case_ids) - 1, max(1, round(fraction * len(case_ids))))
    order = np.random.default_rng([seed, 3, task_index]).permutation(len(case_ids))
    val = {case_ids[i] for i in order[:n_val]}
    return [c for c in case_ids if c not in val], [c for c in case_ids if c in val]


def prepare_tasks(cfg: SegmentationSection | RunConfig, ctx: DistContext | None = None, log=print) -> list[PreparedTask]:
    """Check every case, compute the median spacings, fill the cache; the same answer on all ranks."""
    ctx = ctx or DistContext()
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    plans = [_plan_task(cfg, task, cache_root) for task in cfg.tasks]
    work = [(t, c) for t, plan in enumerate(plans) for c in range(len(plan.cases))]

    # 1. check every case (each rank its share), then share the results
    mine = {}
    for k in range(ctx.rank, len(work), ctx.world_size):
        t, c = work[k]
        plan = plans[t]
        mine[k] = _inspect_cached(plan.cases[c], plan.num_classes, plan.channel, plan.cache)
    results: dict[int, dict] = {}
    for part in ctx.all_gather_object(mine):
        results.update(part)
    bad = [(plans[t].task.name, results[k]["error"]) for k, (t, c) in enumerate(work) if results[k]["error"]]
    _report_bad(bad, cfg.skip_bad_cases)

    # 2. per task: median spacing, settings key, good cases
    prepared, keys, pres = [], [], []
    for t, plan in enumerate(plans):
        good = [(c, results[k]) for k, (tt, c) in enumerate(work) if tt == t and not results[k]["error"]]
        if not good:
            raise DataError(f"task {plan.task.name!r}: no usable case left in {plan.folder}")
        spacing = tuple(float(np.median([r["spacing"][a] for _, r in good])) for a in range(3))
        pre = Preprocess(spacing=spacing, intensity=plan.intensity)
        settings = {"version": CACHE_VERSION, "spacing": [round(s, 6) for s in spacing],
                    "intensity": plan.intensity, "channel": plan.channel}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        ids = [plan.cases[c].case_id for c, _ in good]
        train, val = _split(ids, cfg.val_fraction, cfg.seed, t)
        skipped = [plan.cases[c].case_id for k, (tt, c) in enumerate(work) if tt == t and results[k]["error"]]
        prepared.append(PreparedTask(
            index=t, name=plan.task.name, num_classes=plan.num_classes, class_names=plan.class_names,
            crop=cfg.crop_for(plan.task), spacing=spacing, folder=plan.cache / f"pre-{digest}",
            weight=plan.task.weight, train=train, val=val, skipped=skipped,
        ))
        keys.append(settings)
        pres.append(pre)

    # 3. preprocess what the cache lacks (each rank its share), collecting failures for all ranks
    def fill(indices) -> dict[int, str]:
        failures = {}
        for k in indices:
            t, c = work[k]
            if results[k]["error"]:
                continue
            plan, task = plans[t], prepared[t]
            case = plan.cases[c]
            try:
                key = {**keys[t], "fingerprint": _fingerprint(case)}
                if is_cached(task.folder, case.case_id, key):
                    continue
                _preprocess(case, plan.channel, pres[t], task.folder, key)
            except (VolumeReadError, OSError, ValueError, RuntimeError) as err:
                failures[k] = f"{case.image}: preprocessing failed ({type(err).__name__}: {err})"
        return failures

    todo = sum(1 for k in range(len(work)) if not results[k]["error"])
    log(f"data: {len(plans)} task(s), {todo} case(s); checking the preprocessing cache in {cache_root}")
    failed = sorted(set(fill_everywhere(ctx, len(work), fill).values()))
    if failed:
        raise DataError("preprocessing failed:\n" + "\n".join(f"  {m}" for m in failed[:20]))
    for task in prepared:
        log(f"data: {task.name}: {task.num_classes} classes, {len(task.train)} train / {len(task.val)} val "
            f"case(s), median spacing {tuple(round(s, 3) for s in task.spacing)} mm, crop {task.crop}"
            + (f", {len(task.skipped)} skipped" if task.skipped else ""))
    return prepared


# -- sampling ------------------------------------------------------------------------------------

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

    def __init__(self, tasks: list[PreparedTask], plan: MicroBatchPlan, seed: int, foreground_prob: float, augment: bool):
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
