"""Classification data: a CSV of labelled volumes, checked, preprocessed once, sampled like the co-training.

``nodules.csv`` has a header and one row per volume: ``path,label`` and optionally ``split``.

- ``path``: a NIfTI file, a DICOM series folder or a 3-D ``.npy`` array (read with
  ``med3d_hub.data.io.read_volume``; ``.npy`` files are read with ``allow_pickle=False``); relative
  paths are taken from the CSV's folder.
- ``label``: an integer class, 0 .. num_classes - 1.
- ``split``: ``train``, ``val`` (or ``valid``, ``validation``), ``test`` (kept out of training and
  validation) or empty (training). Without a ``split`` column, a seeded split stratified by
  label holds out ``val_fraction`` of the rows.

Every bad row is reported at once, by its line number in the file (``line 7: ...``); with
``skip_bad_cases`` they are skipped with a warning instead. Each volume is preprocessed
(``spacing`` resampling if set, intensity normalisation, trilinear resize to ``crop``) and cached
as ``.npy`` beside its label, keyed by the file (path, size, modification time) and the settings.

Sampling reuses the co-training's ``MicroBatchPlan``: crop ``j`` of micro-batch ``g`` is a
function of ``(seed, g, j)`` only, so a resumed or multi-process run draws the same samples.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.io import VolumeReadError, read_volume
from ..data.preprocess import PAPER_PREPROCESS, Preprocess
from .cache import (
    DataError, cache_root, fill_everywhere, fingerprint, forget_case, is_cached, report_bad, save_case, settings_folder,
    source_folder,
)
from ..inference.distributed import DistContext
from .config import ConfigError
from .finetune_config import ClsFinetuneConfig
from .sampling import MicroBatchPlan

__all__ = ["ClsTask", "CsvRow", "LabelledVolumeDataset", "prepare_classification", "read_label_csv"]

CACHE_VERSION = 1
CLS_ARRAYS = (".npy",)  # a case is <case_id>.npy and <case_id>.json (see cache.py)
_SPLITS = {"train": "train", "training": "train", "": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test"}


@dataclass(frozen=True)
class CsvRow:
    line: int
    path: Path
    label: int
    split: str | None  # train, val, test, or None when the file has no split column

    @property
    def case_id(self) -> str:
        stem = self.path.name
        for ext in (".nii.gz", ".nii", ".npy"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60]
        return f"line{self.line:05d}_{safe}"


def read_label_csv(path: str | os.PathLike, num_classes: int | None = None) -> tuple[list[CsvRow], list[str]]:
    """The good rows and the problems of the others (``"line N: ..."``); files are checked to exist."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"--csv {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise DataError(f"--csv {path}: not a UTF-8 text file") from None
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected a header line path,label[,split]") from None
    columns = [h.strip().lower() for h in header]
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataError(f"{path}: line 1: the header {header} lacks {', '.join(missing)}; expected path,label[,split]")
    unknown = [h for h in columns if h not in ("path", "label", "split")]
    if unknown:
        raise DataError(f"{path}: line 1: unknown column(s) {unknown}; expected path,label[,split]")
    at = {c: columns.index(c) for c in columns}
    has_split = "split" in at
    rows, bad = [], []
    for values in reader:
        line = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(columns):
            bad.append(f"line {line}: {len(values)} value(s), the header has {len(columns)} ({','.join(columns)})")
            continue
        raw_path, raw_label = values[at["path"]].strip(), values[at["label"]].strip()
        if not raw_path:
            bad.append(f"line {line}: the path is empty")
            continue
        try:
            label = int(raw_label)
        except ValueError:
            try:
                as_float = float(raw_label)
            except ValueError:
                as_float = None
            if as_float is None or not as_float.is_integer():
                bad.append(f"line {line}: label {raw_label!r} is not an integer class")
                continue
            label = int(as_float)
        if label < 0 or (num_classes is not None and label >= num_classes):
            top = f"0..{num_classes - 1} (num_classes {num_classes})" if num_classes else "0 or more"
            bad.append(f"line {line}: label {label} outside {top}")
            continue
        split = None
        if has_split:
            split = _SPLITS.get(values[at["split"]].strip().lower())
            if split is None:
                bad.append(f"line {line}: split {values[at['split']].strip()!r} must be train, val, test or empty")
                continue
        file = Path(os.path.expandvars(os.path.expanduser(raw_path)))
        if not file.is_absolute():
            file = path.parent / file
        if not file.exists():
            bad.append(f"line {line}: {file}: no such file or folder")
            continue
        rows.append(CsvRow(line, file, label, split))
    return rows, bad


@dataclass
class ClsTask:
    """The classification data ready to sample: the engine's task interface plus the labels."""

    name: str
    num_classes: int
    class_names: list[str]
    crop: tuple[int, int, int]
    folder: Path
    labels: dict[str, int]
    index: int = 0
    weight: int = 1
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)

    def load(self, case_id: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.folder / f"{case_id}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)

    def class_counts(self, ids: list[str]) -> list[int]:
        counts = [0] * self.num_classes
        for case_id in ids:
            counts[self.labels[case_id]] += 1
        return counts


def _split(rows: list[CsvRow], fraction: float, seed: int) -> dict[int, str]:
    """Line -> train/val/test: the file's split column, else a seeded split stratified by label."""
    if any(r.split is not None for r in rows):
        return {r.line: r.split or "train" for r in rows}
    out = {r.line: "train" for r in rows}
    if fraction <= 0 or len(rows) < 2:
        return out
    rng = np.random.default_rng([seed, 3, 0])
    for label in sorted({r.label for r in rows}):
        group = [r for r in rows if r.label == label]
        n_val = int(round(fraction * len(group)))
        if len(group) >= 2:
            n_val = min(len(group) - 1, max(1, n_val))
        for i in rng.permutation(len(group))[:n_val]:
            out[group[i].line] = "val"
    return out


def prepare_classification(cfg: ClsFinetuneConfig, ctx: DistContext | None = None, log=print) -> list[ClsTask]:
    """Read and check the CSV, split it, fill the preprocessing cache; the same answer on every rank."""
    ctx = ctx or DistContext()
    rows, bad = read_label_csv(cfg.csv, cfg.num_classes)
    num_classes = cfg.num_classes or (max((r.label for r in rows), default=0) + 1)
    if num_classes < 2:
        raise DataError(f"{cfg.csv}: the labels name fewer than two classes; set num_classes (--num-classes)")
    intensity = cfg.intensity or PAPER_PREPROCESS["intensity"]
    try:
        pre = Preprocess(spacing=cfg.spacing, intensity=intensity, size=cfg.crop, size_mode="resize")
    except ValueError as err:
        raise ConfigError(f"intensity/spacing: {err}") from err
    settings = {"version": CACHE_VERSION, **pre.to_dict()}
    folder = settings_folder(source_folder(cache_root(cfg.cache_dir), "cls", Path(cfg.csv)), settings)

    def fill(indices) -> dict[int, str]:
        failures = {}
        for k in indices:
            row = rows[k]
            try:
                key = {**settings, "fingerprint": fingerprint(row.path)}
                if is_cached(folder, row.case_id, key, CLS_ARRAYS):
                    continue
                forget_case(folder, row.case_id)
                image = pre(read_volume(row.path))[0].numpy()
                if not np.isfinite(image).all():
                    raise VolumeReadError("the image holds NaN or infinite values")
                save_case(folder, row.case_id, {CLS_ARRAYS[0]: image}, {"key": key})
            except (VolumeReadError, OSError, ValueError, RuntimeError) as err:
                failures[k] = f"line {row.line}: {row.path}: {err}"
        return failures

    log(f"data: {cfg.csv}: {len(rows)} usable row(s); checking the preprocessing cache in {folder}")
    merged = fill_everywhere(ctx, len(rows), fill)
    bad = bad + [merged[k] for k in sorted(merged)]
    bad.sort(key=lambda m: int(m.split(":")[0].split()[1]))
    report_bad(bad, cfg.skip_bad_cases, "row", str(cfg.csv))
    good = [r for k, r in enumerate(rows) if k not in merged]
    split = _split(good, cfg.val_fraction, cfg.seed)
    names = cfg.class_names or [str(c) for c in range(num_classes)]
    task = ClsTask(
        name=Path(cfg.csv).stem.replace("-", "_") or "cls", num_classes=num_classes, class_names=names,
        crop=cfg.crop, folder=folder, labels={r.case_id: r.label for r in good},
        train=[r.case_id for r in good if split[r.line] == "train"],
        val=[r.case_id for r in good if split[r.line] == "val"],
        test=[r.case_id for r in good if split[r.line] == "test"],
        skipped=[m.split(":")[0] for m in bad], preprocess=pre.to_dict(),
    )
    if not task.train:
        raise DataError(f"{cfg.csv}: no training rows left")
    log(f"data: {task.name}: {num_classes} classes, {len(task.train)} train {task.class_counts(task.train)} / "
        f"{len(task.val)} val {task.class_counts(task.val)} volume(s), input {tuple(cfg.crop)}"
        + (f", {len(task.test)} test row(s) left out" if task.test else "")
        + (f", {len(bad)} skipped" if bad else ""))
    return [task]


class LabelledVolumeDataset(torch.utils.data.Dataset):
    """Item ``(g, j)``: volume ``j`` of micro-batch ``g``, as a (1, D, H, W) image and its label.

    Augmentation (when on): flips along each axis, intensity scale and shift (+-10 %), Gaussian
    noise (std 0.1, probability 0.15); all drawn from the item's own seeded generator.
    """

    def __init__(self, tasks: list[ClsTask], plan: MicroBatchPlan, seed: int, augment: bool):
        self.task, self.plan, self.seed, self.augment = tasks[0], plan, seed, augment

    def __getitem__(self, key: tuple[int, int]) -> dict:
        g, j = key
        rng = np.random.default_rng([self.seed, 2, g, j])
        case_id = self.task.train[int(rng.integers(len(self.task.train)))]
        image = np.array(self.task.load(case_id, mmap=True), dtype=np.float32)
        if self.augment:
            for axis in range(3):
                if rng.random() < 0.5:
                    image = np.flip(image, axis)
            image = image * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
            if rng.random() < 0.15:
                image = image + rng.normal(0.0, 0.1, size=image.shape).astype(np.float32)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                "label": torch.tensor(self.task.labels[case_id]), "task": 0}
