"""Apply a fine-tuned or published model to new scans: masks in the scan's own grid, class probabilities.

    preds = med3d_hub.predict("runs/liver-ft", ["ct/a.nii.gz", "dicom/b/"])
    preds[0].mask, preds[0].affine          # uint8 labels on a.nii.gz's own voxel grid, its affine

The source of the model is one of (``load_predictor``):

- a finished ``med3d finetune`` run folder (``finetuned.safetensors``: the whole network, the
  paper's decoder included; class names from its data);
- a model folder (``config.json`` + ``model.safetensors`` with a head, as ``med3d export`` or
  ``save_pretrained`` write it);
- weights by name, ``resnet10.lits-ft`` (a manifest entry published with its head);
- a local weights file with the architecture given (``model="resnet10"``);
- a model object with a head.

The preprocessing is the source's own (what ``config.json`` or the manifest stores, the rule of
``med3d features``), never guessed; a segmentation runs over the whole preprocessed volume in
windows of the training crop (``sliding_window``), and ``geometry`` takes the class probabilities
back to the scan's grid before the arg-max. A classification gives the class probabilities and the
arg-max class of each scan.

``iter_predictions`` yields one ``Prediction`` per input, in input order, an unreadable input as a
result with an ``error``; ``write_mask`` and ``write_table`` write them atomically.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.io import Volume, read_volume
from ..data.preprocess import Preprocess, transforms_for
from ..errors import Med3DError, MissingFileError, UsageError
from ..files import atomic_write
from . import geometry
from .features import _as_list, _input_name, check_amp, resolve_device, scan_progress_bar
from .sliding_window import sliding_window

__all__ = [
    "DEFAULT_WINDOW", "Prediction", "PredictionError", "Predictor", "iter_predictions", "load_predictor",
    "mask_path", "predict", "write_mask", "write_table",
]

DEFAULT_WINDOW = (64, 96, 96)  # the fine-tuning's default crop, for weights that do not say theirs
TABLE_FORMATS = (".csv", ".parquet")
Input = Union[str, os.PathLike, Volume, np.ndarray]
Source = Union[str, os.PathLike, nn.Module]


class PredictionError(Med3DError, RuntimeError):
    """Some inputs could not be predicted; ``failures`` lists ``(name, message)`` pairs."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int):
        self.failures = list(failures)
        lines = "\n".join(f"  {message}" for _, message in self.failures)
        super().__init__(f"{len(self.failures)} of {total} input(s) failed:\n{lines}\n"
                         "Use med3d_hub.inference.predict.iter_predictions to keep the others and skip these.")


# -- the model --------------------------------------------------------------------------------------


@dataclass
class Predictor:
    """A network with a head, and what applying it needs: task, class names, preprocessing, window."""

    net: nn.Module  # (N, 1, D, H, W) -> logits (N, K) or (N, K, D', H', W')
    task: str  # "seg" or "cls"
    class_names: list[str]
    preprocess: Preprocess
    window: tuple[int, int, int] | None  # the sliding window of a segmentation
    source: str

    def describe(self) -> str:
        what = "segmentation" if self.task == "seg" else "classification"
        window = f", windows of {' x '.join(map(str, self.window))}" if self.task == "seg" else ""
        return f"{what} into {len(self.class_names)} classes ({', '.join(self.class_names)}){window}"


def load_predictor(
    source: Source,
    *,
    model: str | None = None,
    preprocess: Preprocess | dict | None = None,
    window: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Predictor:
    """The ``Predictor`` of a run folder, a model folder, ``name.tag``, a weights file + ``model``, or a model.

    ``preprocess``, ``window`` and ``class_names`` replace what the source says.
    """
    if isinstance(source, nn.Module):
        found = _from_module(source, "the given model")
    else:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            found = _from_folder(path)
        elif path.is_file() or model is not None:
            found = _from_file(path, model)
        elif os.sep in text or "/" in text:
            raise MissingFileError(f"{text}: no such file or folder; give a fine-tuning run folder, a model folder, "
                                   "name.tag, or a weights file with --model")
        else:
            found = _from_name(text)
    if preprocess is not None:
        found.preprocess = transforms_for(preprocess)
    if window is not None:
        found.window = _window(window)
    if class_names is not None:
        if len(class_names) != len(found.class_names):
            raise UsageError(f"{len(class_names)} class names given, the model has {len(found.class_names)} classes")
        found.class_names = [str(n) for n in class_names]
    if found.preprocess.size is not None and found.task == "seg" and found.window is None:
        found.window = found.preprocess.size
    found.window = found.window or DEFAULT_WINDOW
    return found


def _window(values: Sequence[int]) -> tuple[int, int, int]:
    window = tuple(int(v) for v in values)
    if len(window) != 3 or any(v < 1 for v in window):
        raise UsageError(f"the window must be three positive sizes (D, H, W), got {tuple(values)}")
    return window


def _head(model: nn.Module) -> tuple[str, int]:
    """("seg" | "cls", classes) of a zoo model or a fine-tuning network; an encoder is an error."""
    task = getattr(model, "task", None)
    if task in ("seg", "cls") and hasattr(model, "num_classes"):
        return task, int(model.num_classes)
    if getattr(model, "seg_classes", None):
        return "seg", int(model.seg_classes)
    if getattr(model, "num_classes", 0):
        return "cls", int(model.num_classes)
    raise UsageError(
        "the model has no head (an encoder only), so there is nothing to predict; give a fine-tuning run folder "
        "(its finetuned.safetensors holds the decoder), or weights published with their head"
    )


def _numbered(task: str, classes: int) -> list[str]:
    return (["background"] if task == "seg" else ["0"]) + [str(c) for c in range(1, classes)]


def _from_module(model: nn.Module, source: str, preprocess=None, names=None, window=None) -> Predictor:
    task, classes = _head(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("head") == "new":
        raise UsageError(f"{source}: the weights carry no head of this shape, so the head is random; "
                         "give weights that were published with their head")
    if preprocess is None:
        preprocess = _stored_preprocess(model)
    return Predictor(model.eval(), task, list(names or _numbered(task, classes)), preprocess, window, source)


def _stored_preprocess(model: nn.Module) -> Preprocess:
    """The weights' preprocessing; weights that store none get their depth's default entry's (as ``features``)."""
    cfg = getattr(model, "pretrained_cfg", None)
    spec = cfg.get("preprocess") if isinstance(cfg, dict) else None
    if spec is not None:
        return transforms_for(spec)
    from ..weights.manifest import default_entry
    from ..weights.model_files import architecture_of

    try:
        return transforms_for(default_entry(architecture_of(model.block, model.layers)).preprocess)
    except (ValueError, AttributeError):
        return transforms_for(None)


def _from_folder(path: Path) -> Predictor:
    from ..weights import finetuned, model_files

    if finetuned.is_finetune_run(path):
        run = finetuned.read_finetuned(path)
        if run.preprocess is None:
            raise MissingFileError(f"{path} has no {model_files.CONFIG_NAME}, which holds the preprocessing of the "
                                   "weights; the run did not finish")
        names = _class_names(path, run.training, run.task, run.net.num_classes, run.class_names)
        return Predictor(run.net, run.task, names, transforms_for(run.preprocess), run.crop, str(path))
    config_file, weights = path / model_files.CONFIG_NAME, path / model_files.WEIGHTS_NAME
    if not (config_file.is_file() and weights.is_file()):
        raise MissingFileError(f"{path} is neither a fine-tuning run (finetuned.safetensors) nor a model folder "
                               f"({model_files.CONFIG_NAME} + {model_files.WEIGHTS_NAME})")
    from safetensors.torch import load_file

    from ..weights.hub_model import build_from_config

    config = model_files.read_config(config_file)
    model = build_from_config(config)
    state = load_file(str(weights))
    model_files.check_finite(state, source=str(weights))
    model_files.check_state_dict(model, state, source=str(weights))
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg = {"preprocess": config.get("preprocess"), "file": str(weights)}
    task, classes = _head(model)
    training = finetuned.read_training_config(path) or {}
    crop = training.get("crop")
    names = _class_names(path, training, task, classes, None)
    return _from_module(model, str(path), names=names, window=_window(crop) if crop else None)


def _class_names(path: Path, training: dict, task: str, classes: int, given: list[str] | None) -> list[str]:
    """The run's class names: its labels (dataset.json of a segmentation task, class_names of a classification)."""
    if given and len(given) == classes and given != [str(c) for c in range(classes)]:
        return list(given)
    if task == "cls" and isinstance(training.get("class_names"), list) and len(training["class_names"]) == classes:
        return [str(n) for n in training["class_names"]]
    tasks = training.get("tasks") or []
    if task == "seg" and tasks and isinstance(tasks[0], dict) and tasks[0].get("path"):
        folder = Path(os.path.expanduser(str(tasks[0]["path"])))
        if not folder.is_absolute() and training.get("data_root"):
            folder = Path(os.path.expanduser(str(training["data_root"]))) / folder
        from ..files import read_json

        try:
            labels = (read_json(folder / "dataset.json", default={}) or {}).get("labels")
        except (OSError, ValueError):
            labels = None
        if isinstance(labels, dict) and len(labels) == classes:
            return [str(labels.get(str(c), c)) for c in range(classes)]
    return list(given) if given and len(given) == classes else _numbered(task, classes)


def _from_file(path: Path, model: str | None) -> Predictor:
    if model is None:
        raise UsageError(f"{path} is a weights file: give its architecture too (--model resnet10)")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such weights file")
    from ..weights.factory import create_model

    head = _file_head(path)
    if head is None:
        raise UsageError(f"{path} holds no head (fc.* or conv_seg.*): an encoder has nothing to predict")
    return _from_module(create_model(model, pretrained=str(path), **head), str(path))


def _file_head(path: Path) -> dict | None:
    """The head a weights file holds: ``{"num_classes": K}``, ``{"seg_classes": K}`` or None."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k.removeprefix("module."): f.get_slice(k).get_shape() for k in f.keys()}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        shapes = {k.removeprefix("module."): list(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    if "fc.weight" in shapes:
        return {"num_classes": int(shapes["fc.weight"][0])}
    seg = sorted(k for k in shapes if k.startswith("conv_seg.") and k.endswith(".weight"))
    return {"seg_classes": int(shapes[seg[-1]][0])} if seg else None


def _from_name(name: str) -> Predictor:
    from ..weights.factory import create_model

    return _from_module(create_model(name, pretrained=True), name)


# -- one input --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Prediction:
    """The outcome for one input. A segmentation's ``mask`` (uint8) and ``probabilities`` ((K, ...)
    float16, on request) lie on the input's own voxel grid, which ``affine`` maps to RAS+ mm: a
    NIfTI file's own axes and affine, a DICOM series' axes in RAS+ order, an array's (D, H, W). A
    classification has ``probabilities`` (K,) and the arg-max ``label``."""

    index: int
    name: str
    task: str
    class_names: list[str]
    mask: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    label: int | None = None
    affine: np.ndarray | None = None
    header: Any = field(default=None, repr=False)  # the input NIfTI's header, kept for the mask file
    kind: str = "array"  # "nifti", "dicom" or "array": how the input was stored
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def class_name(self) -> str | None:
        return None if self.label is None else self.class_names[self.label]


@dataclass
class _Loaded:
    index: int
    name: str
    x: torch.Tensor | None = None
    volume: Volume | None = None
    kind: str = "array"
    error: str | None = None


def _load(item: Any, index: int, pre: Preprocess) -> _Loaded:
    name = _input_name(item, index)
    try:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if isinstance(item, np.ndarray):
            if item.ndim != 3:
                raise UsageError(f"an array input must be one (D, H, W) volume, got shape {item.shape}")
            item = Volume(item, (1.0, 1.0, 1.0), np.diag([1.0, 1.0, 1.0, 1.0]), name)
        volume = item if isinstance(item, Volume) else read_volume(item)
        kind = "array"
        if not isinstance(item, Volume):
            path = Path(item)
            kind = "dicom" if path.is_dir() else "nifti" if path.name.lower().endswith((".nii", ".nii.gz")) else "array"
        return _Loaded(index, name, pre(volume).float(), volume, kind)
    except (OSError, ValueError) as err:
        message = str(err)
    except Exception as err:  # anything else a damaged file can raise deep in a reader
        message = f"{type(err).__name__}: {err}"
    return _Loaded(index, name, error=message if name in message else f"{name}: {message}")


def _file_grid(loaded: _Loaded) -> tuple[np.ndarray, tuple, Any]:
    """(affine, shape, NIfTI header or None) of the grid the result goes back to."""
    volume = loaded.volume
    if loaded.kind == "nifti":
        import nibabel as nib

        image = nib.load(volume.source)
        return image.affine.astype(np.float64), tuple(image.shape[:3]), image.header
    if loaded.kind == "dicom":  # RAS+ order of the series' voxels: a NIfTI with the series' geometry
        return volume.affine @ geometry.DHW_TO_IJK, tuple(reversed(volume.shape)), None
    return volume.affine, tuple(volume.shape), None


# -- the network ------------------------------------------------------------------------------------


class _Logits(nn.Module):
    """The head's logits at the input's size (a conv_seg head without upsampling gives 1/4)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if y.ndim == 5 and y.shape[2:] != x.shape[2:]:
            y = F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
        return y


def _prepare(net: nn.Module, device: torch.device, fast: bool) -> nn.Module:
    """An eval-mode copy on ``device``; ``fast``: the encoder BatchNorm-folded and channels_last (same outputs)."""
    from .optimize import optimize_for_inference

    if hasattr(net, "encoder") and hasattr(net, "head"):  # a fine-tuning network: the encoder is a zoo model
        net = copy.copy(net)
        net._modules = dict(net._modules)
        net.encoder = optimize_for_inference(net.encoder) if fast else copy.deepcopy(net.encoder)
        net.head = copy.deepcopy(net.head)
    else:
        net = optimize_for_inference(net) if fast else copy.deepcopy(net)
    return _Logits(net.eval()).to(device)


def iter_predictions(
    source: Source | Predictor,
    inputs: Input | Iterable[Input],
    *,
    batch_size: int = 1,
    overlap: float = 0.25,
    probabilities: bool = False,
    device: str | torch.device | None = "auto",
    amp: str | None = None,
    force_amp: bool = False,
    fast: bool = True,
    progress: bool = False,
    **source_options: Any,
) -> Iterator[Prediction]:
    """Yield one ``Prediction`` per input, in input order; failures are results, not exceptions.

    ``batch_size``: windows per forward (segmentation) or volumes per forward (classification).
    ``probabilities``: keep a segmentation's per-class maps (float16). ``source_options`` go to
    ``load_predictor`` (``model``, ``preprocess``, ``window``, ``class_names``). Errors that concern
    the whole run (model, device, options) are raised before the first input is read.
    """
    predictor = source if isinstance(source, Predictor) else load_predictor(source, **source_options)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= overlap < 1:
        raise UsageError(f"overlap must lie in [0, 1), got {overlap}")
    items = _as_list(inputs)
    dev = resolve_device(None if device is None else device, predictor.net)
    amp_dtype = check_amp(amp, dev, force=force_amp)
    net = _prepare(predictor.net, dev, fast)
    bar = scan_progress_bar(len(items), progress, "predict")
    chunk = batch_size if predictor.task == "cls" else 1
    try:
        for group in _chunks(_read_ahead(items, predictor.preprocess, chunk + 1), chunk):
            results = {}
            ready = [item for item in group if item.error is None]
            try:
                if predictor.task == "seg":
                    results = {ready[0].index: _segment(predictor, net, ready[0], dev, amp_dtype, batch_size, overlap,
                                                        probabilities)} if ready else {}
                elif ready:
                    results = {p.index: p for p in _classify(predictor, net, ready, dev, amp_dtype)}
            except (OSError, ValueError) as err:  # a scan the network or the geometry cannot take
                results = {item.index: _failed(predictor, item, str(err)) for item in ready}
            for item in group:
                if bar is not None:
                    bar.update(1)
                yield results.get(item.index) or _failed(predictor, item, item.error)
    finally:
        if bar is not None:
            bar.close()


def _failed(predictor: Predictor, item: _Loaded, message: str) -> Prediction:
    message = message if item.name in message else f"{item.name}: {message}"
    return Prediction(item.index, item.name, predictor.task, predictor.class_names, error=message)


def _read_ahead(items: list, pre: Preprocess, ahead: int) -> Iterator[_Loaded]:
    """The inputs read and preprocessed in a thread, ``ahead`` scans before the network needs them."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="med3d-predict")
    pending: deque = deque()
    try:
        for index, item in enumerate(items):
            pending.append(pool.submit(_load, item, index, pre))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(stream: Iterator[_Loaded], size: int) -> Iterator[list[_Loaded]]:
    group = []
    for item in stream:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _segment(predictor, net, item: _Loaded, device, amp_dtype, batch_size, overlap, keep_probs) -> Prediction:
    x = item.x[None].to(device)
    with torch.inference_mode(), _autocast(device, amp_dtype):
        logits = sliding_window(x, predictor.window, net, batch_size=batch_size, overlap=overlap)[0]
        probs = torch.softmax(logits, dim=0).cpu()
    grid = geometry.grid_of(predictor.preprocess, item.volume, probs.shape[1:])
    probs = geometry.to_scan_grid(probs, predictor.preprocess, grid)
    affine, shape, header = _file_grid(item)
    mask = probs.argmax(dim=0).to(torch.uint8).numpy()
    mask = geometry.from_canonical(mask, item.volume.affine, affine, shape)
    maps = geometry.from_canonical(probs.half().numpy(), item.volume.affine, affine, shape) if keep_probs else None
    return Prediction(item.index, item.name, "seg", predictor.class_names, mask=mask, probabilities=maps,
                      affine=affine, header=header, kind=item.kind)


def _classify(predictor, net, items: list[_Loaded], device, amp_dtype) -> list[Prediction]:
    """One forward for volumes of one preprocessed shape (a classification's fixed size); else one each."""
    shapes = {tuple(item.x.shape) for item in items}
    groups = [items] if len(shapes) == 1 else [[item] for item in items]
    out = []
    for group in groups:
        with torch.inference_mode(), _autocast(device, amp_dtype):
            logits = net(torch.stack([item.x for item in group]).to(device)).float()
            probs = torch.softmax(logits, dim=1).cpu().numpy()
        for item, p in zip(group, probs):
            out.append(Prediction(item.index, item.name, "cls", predictor.class_names, probabilities=p,
                                  label=int(p.argmax()), affine=item.volume.affine, kind=item.kind))
    return out


def predict(source: Source | Predictor, inputs: Input | Iterable[Input], **options: Any) -> list[Prediction]:
    """Predictions for every input, in input order (options: ``iter_predictions``).

    ``source``: a fine-tuning run folder, a model folder, ``name.tag``, a weights file (with
    ``model="resnet10"``) or a model with a head. Raises ``PredictionError`` naming every input that failed.
    """
    results = list(iter_predictions(source, inputs, **options))
    failed = [(r.name, r.error) for r in results if not r.ok]
    if failed:
        raise PredictionError(failed, len(results))
    return results


# -- writing ----------------------------------------------------------------------------------------


def mask_path(name: str, folder: str | os.PathLike, kind: str) -> Path:
    """``masks/ct_001.nii.gz`` for ``ct/ct_001.nii.gz`` or a DICOM folder ``ct_001/``; ``.npy`` for arrays."""
    stem = Path(name.rstrip("/\\")).name
    for ext in (".nii.gz", ".nii", ".npy"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    if not stem or stem in (".", ".."):
        raise UsageError(f"cannot name a mask after the input {name!r}")
    return Path(folder) / (stem + (".npy" if kind == "array" else ".nii.gz"))


def write_mask(pred: Prediction, path: str | os.PathLike, *, probabilities: bool = False, source: str = "") -> list[Path]:
    """Write the mask (uint8 labels; NIfTI with the input's affine and header, or ``.npy``), a sidecar
    JSON naming the labels and, with ``probabilities``, a float16 ``_probabilities.npz`` of the maps.

    Every file is written to a temporary name and renamed. Returns the paths written."""
    path = Path(path)
    labels = {str(i): n for i, n in enumerate(pred.class_names)}
    stem = path.name.removesuffix(".nii.gz").removesuffix(".npy")
    written = []
    if path.name.endswith(".npy"):
        with atomic_write(path) as f:
            np.save(f, pred.mask, allow_pickle=False)
    else:
        import nibabel as nib

        header = pred.header.copy() if pred.header is not None else None
        image = nib.Nifti1Image(pred.mask, pred.affine, header=header)
        image.set_data_dtype(np.uint8)
        image.header.set_slope_inter(1.0, 0.0)
        description = "labels " + " ".join(f"{i}={n}" for i, n in labels.items())
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
        image.header["cal_min"], image.header["cal_max"] = 0, len(labels) - 1
        with atomic_write(path) as f:
            f.write(image.to_bytes() if not path.name.endswith(".gz") else _gzip(image.to_bytes()))
    written.append(path)
    sidecar = path.with_name(stem + ".json")
    meta = {"labels": labels, "input": pred.name, "model": source, "shape": list(pred.mask.shape),
            "affine": np.asarray(pred.affine).tolist()}
    with atomic_write(sidecar) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode())
    written.append(sidecar)
    if probabilities and pred.probabilities is not None:
        maps = path.with_name(stem + "_probabilities.npz")
        with atomic_write(maps) as f:
            np.savez_compressed(f, probabilities=pred.probabilities, affine=np.asarray(pred.affine),
                                class_names=np.array(pred.class_names))
        written.append(maps)
    return written


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1, mtime=0)


def check_table_output(path: str | os.PathLike) -> Path:
    """Check before the run that a classification table can be written to ``path``."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_FORMATS:
        raise UsageError(f"a classification writes a table: give a .csv or .parquet file, not {path.name!r}")
    if not path.parent.is_dir():
        raise MissingFileError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.suffix.lower() == ".parquet":
        try:
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise UsageError(f"writing .parquet needs pandas and pyarrow ({err.name} is missing); write .csv") from None
    return path


def write_table(preds: Sequence[Prediction], path: str | os.PathLike) -> Path:
    """One row per classified input: ``file``, ``p_<class>`` per class, ``predicted`` (the arg-max class)."""
    path = check_table_output(path)
    rows = [p for p in preds if p.ok]
    names = rows[0].class_names if rows else []
    columns = ["file", *(f"p_{n}" for n in names), "predicted"]
    records = [[p.name, *(float(v) for v in p.probabilities), p.class_name] for p in rows]
    if path.suffix.lower() == ".parquet":
        import pandas as pd

        frame = pd.DataFrame(records, columns=columns)
        with atomic_write(path) as f:
            frame.to_parquet(f, index=False)
        return path
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for record in records:
        writer.writerow([record[0], *(repr(v) for v in record[1:-1]), record[-1]])
    with atomic_write(path) as f:
        f.write(text.getvalue().encode("utf-8"))
    return path
