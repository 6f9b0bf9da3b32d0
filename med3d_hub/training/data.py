"""MSD segmentation tasks (the co-training and segmentation fine-tuning): find the cases, check every
one, preprocess each once into the cache (``cache.py``).

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
spacings, so all ranks agree on what is skipped or wrong. Crops are drawn by ``sampling.py``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.io import Volume, VolumeReadError, read_volume
from ..data.preprocess import PAPER_PREPROCESS, Preprocess
from ..files import read_json
from .cache import (
    DataError, cache_root, fill_everywhere, fingerprint, forget_case, is_cached, report_bad, save_case, settings_folder,
    source_folder, write_json,
)
from .config import ConfigError, SegmentationSection, TaskConfig
from ..inference.distributed import DistContext

__all__ = ["Case", "PreparedTask", "discover_cases", "prepare_tasks"]

# Bump when the cached arrays would change for the same files and settings.
CACHE_VERSION = 1
# Foreground voxels kept per class and case for oversampling (a uniform sample of them).
FG_SAMPLES_PER_CLASS = 10_000
_NIFTI = (".nii.gz", ".nii")


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
    return fingerprint(case.image) + fingerprint(case.label)


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
    write_json(record_path, {"key": key, "result": result})
    return result


def _preprocess(case: Case, channel: int | None, pre: Preprocess, out: Path, key: dict) -> None:
    """Resample, clip and z-score one case; write its arrays and then its metadata (the commit)."""
    forget_case(out, case.case_id)
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


# A case in the cache (see cache.py): its preprocessed image, label and sampled foreground voxels.
SEG_ARRAYS = (".image.npy", ".label.npy", ".fg.npy")


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


def _plan_task(cfg: SegmentationSection, task: TaskConfig, root: Path) -> _TaskPlan:
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
    return _TaskPlan(task, folder, source_folder(root, task.name, folder), num_classes, names, channel, intensity, cases)


def _split(case_ids: list[str], fraction: float, seed: int, task_index: int) -> tuple[list[str], list[str]]:
    """A seeded split; at least one validation case when the fraction is > 0 and there are two or more."""
    if fraction <= 0 or len(case_ids) < 2:
        return list(case_ids), []
    n_val = min(len(case_ids) - 1, max(1, round(fraction * len(case_ids))))
    order = np.random.default_rng([seed, 3, task_index]).permutation(len(case_ids))
    val = {case_ids[i] for i in order[:n_val]}
    return [c for c in case_ids if c not in val], [c for c in case_ids if c in val]


def prepare_tasks(cfg: SegmentationSection, ctx: DistContext | None = None, log=print) -> list[PreparedTask]:
    """Check every case, compute the median spacings, fill the cache; the same answer on all ranks.

    ``cfg`` is a config with the segmentation section (``TrainConfig``, ``SegFinetuneConfig``).
    """
    ctx = ctx or DistContext()
    root = cache_root(cfg.cache_dir)
    plans = [_plan_task(cfg, task, root) for task in cfg.tasks]
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
    report_bad([f"[{plans[t].task.name}] {results[k]['error']}" for k, (t, c) in enumerate(work) if results[k]["error"]],
               cfg.skip_bad_cases, "case")

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
        ids = [plan.cases[c].case_id for c, _ in good]
        train, val = _split(ids, cfg.val_fraction, cfg.seed, t)
        skipped = [plan.cases[c].case_id for k, (tt, c) in enumerate(work) if tt == t and results[k]["error"]]
        prepared.append(PreparedTask(
            index=t, name=plan.task.name, num_classes=plan.num_classes, class_names=plan.class_names,
            crop=cfg.crop_for(plan.task), spacing=spacing, folder=settings_folder(plan.cache, settings),
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
                if is_cached(task.folder, case.case_id, key, SEG_ARRAYS):
                    continue
                _preprocess(case, plan.channel, pres[t], task.folder, key)
            except (VolumeReadError, OSError, ValueError, RuntimeError) as err:
                failures[k] = f"{case.image}: preprocessing failed ({type(err).__name__}: {err})"
        return failures

    todo = sum(1 for k in range(len(work)) if not results[k]["error"])
    log(f"data: {len(plans)} task(s), {todo} case(s); checking the preprocessing cache in {root}")
    failed = sorted(set(fill_everywhere(ctx, len(work), fill).values()))
    if failed:
        raise DataError("preprocessing failed:\n" + "\n".join(f"  {m}" for m in failed[:20]))
    for task in prepared:
        log(f"data: {task.name}: {task.num_classes} classes, {len(task.train)} train / {len(task.val)} val "
            f"case(s), median spacing {tuple(round(s, 3) for s in task.spacing)} mm, crop {task.crop}"
            + (f", {len(task.skipped)} skipped" if task.skipped else ""))
    return prepared
