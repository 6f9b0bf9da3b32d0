"""Apply a fine-tuned or published model to new scans: masks in the scan's own grid, class probabilities.

    preds = med3d_hub.predict("runs/liver-ft", ["ct/a.nii.gz", "dicom/b/"])
    preds[0].mask, preds[0].affine          # uint8 labels on a.nii.gz's own voxel grid, its affine

What is applied (the network, its preprocessing, class names and window) is a ``Predictor``, read
from a run folder, a model folder, ``name.tag``, a weights file or a model (``predictor.py``). A
segmentation runs over the whole preprocessed volume in windows of the training crop
(``sliding_window``), and ``geometry`` takes the class probabilities back to the scan's grid before
the arg-max. A classification gives the class probabilities and the arg-max class of each scan.

``iter_predictions`` yields one ``Prediction`` per input, in input order, an unreadable input as a
result with an ``error``; ``write_mask`` and ``write_table`` (``prediction_files.py``) write them
atomically.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.inputs import InputItem, as_item, read_input
from ..data.io import Volume
from ..data.preprocess import Preprocess
from ..errors import Med3DError, UsageError
from . import geometry
from .features import _as_list, _input_name, check_channels, scan_progress_bar
from .prediction_files import check_table_output, mask_path, write_mask, write_table
from .predictor import DEFAULT_WINDOW, Predictor, Source, load_predictor
from .runtime import check_amp, resolve_device
from .sliding_window import sliding_window

__all__ = [  # the predictor and the files are their modules'; here too, for one import
    "DEFAULT_WINDOW", "Prediction", "PredictionError", "Predictor", "check_table_output", "iter_predictions",
    "load_predictor", "mask_path", "predict", "write_mask", "write_table",
]

Input = Union[str, os.PathLike, InputItem, Volume, np.ndarray]


class PredictionError(Med3DError, RuntimeError):
    """Some inputs could not be predicted; ``failures`` lists ``(name, message)`` pairs."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int):
        self.failures = list(failures)
        lines = "\n".join(f"  {message}" for _, message in self.failures)
        super().__init__(f"{len(self.failures)} of {total} input(s) failed:\n{lines}\n"
                         "Use med3d_hub.inference.predict.iter_predictions to keep the others and skip these.")


# -- one input --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Prediction:
    """The outcome for one input. A segmentation's ``mask`` (uint8) and ``probabilities`` ((K, ...)
    float16, on request) lie on the input's own voxel grid, which ``affine`` maps to RAS+ mm: a
    NIfTI file's own axes and affine, a DICOM series' or an NRRD/MetaImage file's axes in RAS+ order,
    an array's (D, H, W). A
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
    kind: str = "array"  # "nifti", "dicom", "image" (NRRD, MetaImage) or "array": how the input was stored
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


def _load(item: Any, index: int, pre: Preprocess, in_chans: int = 1) -> _Loaded:
    name = _input_name(item, index)
    try:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if isinstance(item, np.ndarray):
            if item.ndim != 3:
                raise UsageError(f"an array input must be one (D, H, W) volume, got shape {item.shape}")
            item = Volume(item, (1.0, 1.0, 1.0), np.diag([1.0, 1.0, 1.0, 1.0]), name)
        volume = item if isinstance(item, Volume) else read_input(item)
        kind = "array" if isinstance(item, Volume) else as_item(item).kind
        x = pre(volume).float()
        check_channels(x.shape[0], in_chans)
        return _Loaded(index, name, x, volume, kind)
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
    if loaded.kind in ("dicom", "image"):  # RAS+ order of the scan's voxels: a NIfTI with the scan's geometry
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
        for group in _chunks(_read_ahead(items, predictor.preprocess, chunk + 1, _in_chans(predictor.net)), chunk):
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


def _in_chans(net: nn.Module) -> int:
    """The input channels of a zoo model or of a fine-tuning network's encoder."""
    return int(getattr(net, "in_chans", None) or getattr(getattr(net, "encoder", None), "in_chans", 1))


def _read_ahead(items: list, pre: Preprocess, ahead: int, in_chans: int = 1) -> Iterator[_Loaded]:
    """The inputs read and preprocessed in a thread, ``ahead`` scans before the network needs them."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="med3d-predict")
    pending: deque = deque()
    try:
        for index, item in enumerate(items):
            pending.append(pool.submit(_load, item, index, pre, in_chans))
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
