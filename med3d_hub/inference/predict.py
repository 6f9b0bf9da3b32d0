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
atomically. The inputs are read and preprocessed by the pipeline of ``features``
(``reading.read_ahead``: worker processes, the same NaN policy, the same failures).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from . import geometry
from .prediction_files import check_table_output, mask_path, write_mask, write_table
from .predictor import DEFAULT_WINDOW, Predictor, Source, load_predictor
from .reading import (
    Input, InputResult, InputsFailedError, Loaded, as_list, check_reading, failure_message, read_ahead,
    scan_progress_bar, to_device,
)
from .runtime import autocast, check_amp, resolve_device
from .sliding_window import sliding_window

__all__ = [  # the predictor and the files are their modules'; here too, for one import
    "DEFAULT_WINDOW", "Prediction", "PredictionError", "Predictor", "check_table_output", "iter_predictions",
    "load_predictor", "mask_path", "predict", "write_mask", "write_table",
]

# Some inputs failed: the one error of every reading pipeline (``reading.InputsFailedError``).
PredictionError = InputsFailedError


# -- one input --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Prediction(InputResult):
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
    def class_name(self) -> str | None:
        return None if self.label is None else self.class_names[self.label]


def _file_grid(loaded: Loaded) -> tuple[np.ndarray, tuple, Any]:
    """(affine, shape, NIfTI header or None) of the grid the result goes back to."""
    scan = loaded.scan
    if scan.kind == "nifti":
        import nibabel as nib

        image = nib.load(scan.source)
        return image.affine.astype(np.float64), tuple(image.shape[:3]), image.header
    if scan.kind in ("dicom", "image"):  # RAS+ order of the scan's voxels: a NIfTI with the scan's geometry
        return scan.affine @ geometry.DHW_TO_IJK, tuple(reversed(scan.shape)), None
    return scan.affine, tuple(scan.shape), None


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
    workers: int | None = None,
    nan_policy: str = "error",
    **source_options: Any,
) -> Iterator[Prediction]:
    """Yield one ``Prediction`` per input, in input order; failures are results, not exceptions.

    ``batch_size``: windows per forward (segmentation) or volumes per forward (classification).
    ``probabilities``: keep a segmentation's per-class maps (float16). ``workers`` and
    ``nan_policy`` are those of ``extract_features``. ``source_options`` go to ``load_predictor``
    (``model``, ``preprocess``, ``window``, ``class_names``). Errors that concern the whole run
    (model, device, options) are raised before the first input is read.
    """
    predictor = source if isinstance(source, Predictor) else load_predictor(source, **source_options)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= overlap < 1:
        raise UsageError(f"overlap must lie in [0, 1), got {overlap}")
    check_reading(predictor.preprocess, workers, nan_policy)
    items = as_list(inputs)
    dev = resolve_device(None if device is None else device, predictor.net)
    amp_dtype = check_amp(amp, dev, force=force_amp)
    net = _prepare(predictor.net, dev, fast)
    stream = read_ahead(items, predictor.preprocess, workers=workers, nan_policy=nan_policy, device=dev,
                        in_chans=_in_chans(predictor.net))
    return _run(predictor, net, stream, len(items), dev, amp_dtype, batch_size, overlap, probabilities, progress)


def _run(predictor, net, stream, total, dev, amp_dtype, batch_size, overlap, probabilities, progress):
    bar = scan_progress_bar(total, progress, "predict")
    chunk = batch_size if predictor.task == "cls" else 1
    try:
        for group in _chunks(stream, chunk):
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


def _failed(predictor: Predictor, item: Loaded, message: str) -> Prediction:
    return Prediction(item.index, item.name, predictor.task, predictor.class_names,
                      error=failure_message(item.name, message))


def _in_chans(net: nn.Module) -> int:
    """The input channels of a zoo model or of a fine-tuning network's encoder."""
    return int(getattr(net, "in_chans", None) or getattr(getattr(net, "encoder", None), "in_chans", 1))


def _chunks(stream: Iterator[Loaded], size: int) -> Iterator[list[Loaded]]:
    group = []
    for item in stream:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _segment(predictor, net, item: Loaded, device, amp_dtype, batch_size, overlap, keep_probs) -> Prediction:
    x = to_device(item.x, device)[None]
    with torch.inference_mode(), autocast(device, amp_dtype):
        logits = sliding_window(x, predictor.window, net, batch_size=batch_size, overlap=overlap)[0]
        probs = torch.softmax(logits, dim=0).cpu()
    scan = item.scan
    probs = geometry.to_scan_grid(probs, predictor.preprocess, scan.grid)
    affine, shape, header = _file_grid(item)
    mask = probs.argmax(dim=0).to(torch.uint8).numpy()
    mask = geometry.from_canonical(mask, scan.affine, affine, shape)
    maps = geometry.from_canonical(probs.half().numpy(), scan.affine, affine, shape) if keep_probs else None
    return Prediction(item.index, item.name, "seg", predictor.class_names, mask=mask, probabilities=maps,
                      affine=affine, header=header, kind=scan.kind)


def _classify(predictor, net, items: list[Loaded], device, amp_dtype) -> list[Prediction]:
    """One forward for volumes of one preprocessed shape (a classification's fixed size); else one each."""
    shapes = {tuple(item.x.shape) for item in items}
    groups = [items] if len(shapes) == 1 else [[item] for item in items]
    out = []
    for group in groups:
        with torch.inference_mode(), autocast(device, amp_dtype):
            logits = net(torch.stack([to_device(item.x, device) for item in group])).float()
            probs = torch.softmax(logits, dim=1).cpu().numpy()
        for item, p in zip(group, probs):
            out.append(Prediction(item.index, item.name, "cls", predictor.class_names, probabilities=p,
                                  label=int(p.argmax()), affine=item.scan.affine, kind=item.scan.kind))
    return out


def predict(source: Source | Predictor, inputs: Input | Iterable[Input], **options: Any) -> list[Prediction]:
    """Predictions for every input, in input order (options: ``iter_predictions``).

    ``source``: a fine-tuning run folder, a model folder, ``name.tag``, a weights file (with
    ``model="resnet10"``) or a model with a head. Raises ``PredictionError`` naming every input that failed.
    """
    results = list(iter_predictions(source, inputs, **options))
    failed = [(r.name, r.error) for r in results if not r.ok]
    if failed:
        raise InputsFailedError(failed, len(results), "med3d_hub.inference.predict.iter_predictions")
    return results
