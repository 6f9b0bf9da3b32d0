"""Embeddings and feature maps of volumes: read, preprocess, batch, forward, write.

``extract_features(model, ["a.nii.gz", "b.nii.gz"])`` returns one row per input, in input order.
Underneath, ``iter_features`` yields one ``FeatureResult`` per input (features or an error), so a
caller such as the ``med3d`` command can report and skip an unreadable file without losing the
others.

How the work is arranged:

* Reading and preprocessing run in worker processes a few volumes ahead of the network
  (``reading.read_ahead``, the pipeline ``predict`` uses too), so file I/O and resampling overlap
  the forward pass instead of adding to it.
* Consecutive volumes with the same preprocessed shape share a batch (up to ``batch_size``); a
  volume of another shape starts a new batch. Set a fixed ``size`` in the preprocessing to batch
  everything.
* The network runs through ``optimize_for_inference`` (BatchNorm folded into the convs, the
  channels_last_3d layout) unless ``fast=False``; outputs equal the plain model's within float
  rounding.
* ``amp="bf16"`` or ``"fp16"`` runs the forward under autocast. On a CPU without native support for
  that type (AVX512-BF16 or AMX) autocast is emulated and hundreds of times slower than fp32, so it
  is refused there unless ``force_amp=True``.

Writing and reading feature files (``save_features``, ``load_features``, ``check_output``) is
``feature_files``; the names are here too, for one import.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.preprocess import Preprocess, transforms_for
from ..errors import UsageError
from .feature_files import OUTPUT_FORMATS, Features, SavedFeatures, check_output, load_features, save_features
from .reading import (
    NAN_POLICIES, Input, InputResult, InputsFailedError, as_list, check_reading, input_name, read_ahead,
    scan_progress_bar, to_device,
)
from .runtime import autocast, check_amp, resolve_device

__all__ = [
    "MAPS",
    "NAN_POLICIES",
    "OUTPUT_FORMATS",
    "SavedFeatures",
    "FeatureExtractionError",
    "FeatureResult",
    "check_amp",
    "check_output",
    "describe_preprocess",
    "extract_features",
    "iter_features",
    "load_features",
    "resolve_device",
    "save_features",
    "stack_results",
]

# What a forward returns per volume: the pooled embedding (C,), the layer4 map (C, d, h, w), or the
# outputs of layer1..layer4 (a dict of maps).
MAPS = ("pooled", "layer4", "stages")
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
# Some inputs failed: the one error of every reading pipeline (``reading.InputsFailedError``).
FeatureExtractionError = InputsFailedError


@dataclass(frozen=True, eq=False)
class FeatureResult(InputResult):
    """The outcome for one input: ``features`` or ``error`` (a message that names the input)."""

    index: int  # position in the inputs
    name: str  # the path as given, or "<array i>" / the Volume's source
    features: Features | None = None
    shape: tuple[int, int, int] | None = None  # the preprocessed (D, H, W) the network saw
    error: str | None = None


# -- the network side ------------------------------------------------------------------------------


def _check_model(model: nn.Module, maps: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch model such as med3d_hub.create_model('resnet10'), got {type(model).__name__}")
    needed = {"pooled": ("forward_features", "forward_head"), "layer4": ("forward_features",), "stages": ("forward_stages",)}
    missing = [m for m in needed[maps] if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"{type(model).__name__} lacks {', '.join(missing)}; pass a model from med3d_hub.create_model "
            "(not one wrapped by torch.compile or DataParallel)."
        )


def _prepare(model: nn.Module, device: torch.device, fast: bool) -> nn.Module:
    """An eval-mode network on ``device``, never the caller's module changed in place."""
    if fast:
        from .optimize import optimize_for_inference

        return optimize_for_inference(model).to(device)
    net = copy.deepcopy(model) if (model.training or _device_of(model) != device) else model
    return net.eval().to(device)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _forward(net: nn.Module, x: torch.Tensor, maps: str, amp_dtype: torch.dtype | None) -> list[Features]:
    """One batch through the network; per-volume numpy float32 results, in batch order."""
    with torch.inference_mode(), autocast(x.device, amp_dtype):
        if maps == "pooled":
            out = net.forward_head(net.forward_features(x), pre_logits=True)
            outs = {"": out}
        elif maps == "layer4":
            outs = {"": net.forward_features(x)}
        else:
            outs = dict(zip(STAGE_NAMES, net.forward_stages(x)[1:]))
    arrays = {k: v.float().contiguous().cpu().numpy() for k, v in outs.items()}
    if maps != "stages":
        return list(arrays[""])
    return [{k: a[i] for k, a in arrays.items()} for i in range(x.shape[0])]


# -- the reading side ------------------------------------------------------------------------------


def _as_transform(preprocess: Any, model: nn.Module) -> Callable[[Any], torch.Tensor]:
    if preprocess is None:
        return transforms_for(model)
    if isinstance(preprocess, (Preprocess, Mapping)):
        return transforms_for(preprocess)
    if callable(preprocess):
        return preprocess
    raise TypeError(
        f"preprocess must be a Preprocess, a preprocessing dict or a callable, got {type(preprocess).__name__}"
    )


def describe_preprocess(p: Preprocess) -> str:
    """One line saying what a ``Preprocess`` does, for printouts."""
    params = ", ".join(f"{k} {v:g}" for k, v in p.intensity.items() if k != "method")
    return "; ".join([
        f"resample to {' x '.join(f'{s:g}' for s in p.spacing)} mm" if p.spacing else "spacing kept",
        {True: "crop to non-zero voxels", False: "no crop"}.get(p.crop_foreground, "drop blank D-planes"),
        p.intensity["method"] + (f" ({params})" if params else ""),
        f"{p.size_mode} to {' x '.join(map(str, p.size))}" if p.size else "size kept",
    ])


# -- the public functions --------------------------------------------------------------------------


def iter_features(
    model: nn.Module,
    inputs: Iterable[Input],
    *,
    preprocess: Preprocess | Mapping | Callable | None = None,
    maps: str = "pooled",
    batch_size: int = 1,
    device: str | torch.device | None = None,
    amp: str | None = None,
    force_amp: bool = False,
    fast: bool = True,
    workers: int | None = None,
    progress: bool = False,
    nan_policy: str = "error",
) -> Iterator[FeatureResult]:
    """Yield one ``FeatureResult`` per input, in input order; failures are results, not exceptions.

    Arguments are those of ``extract_features``. Errors that concern the whole run (a bad model,
    device or option) are raised before the first input is read.
    """
    maps = _check_maps(maps)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _check_model(model, maps)
    transform = _as_transform(preprocess, model)
    check_reading(transform, workers, nan_policy)
    device = resolve_device(device, model)
    amp_dtype = check_amp(amp, device, force=force_amp)
    items = as_list(inputs)
    names = [input_name(item, i) for i, item in enumerate(items)]
    stream = read_ahead(items, transform, workers=workers, nan_policy=nan_policy, device=device, names=names,
                        in_chans=getattr(model, "in_chans", 1))
    return _run(model, stream, len(items), maps, batch_size, device, amp_dtype, fast, progress)


def _run(model, stream, total, maps, batch_size, device, amp_dtype, fast, progress) -> Iterator[FeatureResult]:
    net = _prepare(model, device, fast) if total else None
    bar = scan_progress_bar(total, progress)
    pending: list = []  # one batch of consecutive volumes of one shape (``reading.Loaded``)

    def flush() -> list[FeatureResult]:
        if not pending:
            return []
        x = torch.stack([to_device(item.x, device) for item in pending])
        shape = tuple(x.shape[2:])
        done = [FeatureResult(item.index, item.name, features=feats, shape=shape)
                for item, feats in zip(pending, _forward(net, x, maps, amp_dtype))]
        pending.clear()
        return done

    try:
        for item in stream:
            if item.error is not None:
                done = flush() + [FeatureResult(item.index, item.name, error=item.error)]
            else:
                done = flush() if pending and pending[0].x.shape != item.x.shape else []
                pending.append(item)
                if len(pending) == batch_size:
                    done += flush()
            for result in done:
                if bar is not None:
                    bar.update(1)
                yield result
        for result in flush():
            if bar is not None:
                bar.update(1)
            yield result
    finally:
        if bar is not None:
            bar.close()


def extract_features(
    model: nn.Module,
    inputs: Input | Iterable[Input],
    *,
    preprocess: Preprocess | Mapping | Callable | None = None,
    maps: str = "pooled",
    batch_size: int = 1,
    device: str | torch.device | None = None,
    amp: str | None = None,
    force_amp: bool = False,
    fast: bool = True,
    workers: int | None = None,
    progress: bool = False,
    nan_policy: str = "error",
    convention: str | None = None,
) -> Features:
    """Features of each input, stacked in input order.

    Args:
        model: a model from ``create_model`` (any head; its backbone is used).
        inputs: paths (NIfTI, NRRD, MetaImage, DICOM series folders, ``.npy``), ``InputItem``s
            (``med3d_hub.data.inputs.expand_inputs``: each series of a DICOM folder, one channel of a
            4-D image, one file per channel), ``Volume`` objects or (D, H, W) arrays (taken at 1 mm);
            a single one is accepted too. A model with ``in_chans`` > 1 takes inputs of that many channels.
        preprocess: None for the weights' own preprocessing (``transforms_for(model)``), or a
            ``Preprocess``, a preprocessing dict, or any callable returning a (1, D, H, W) tensor.
        maps: "pooled" -> (N, C) embeddings; "layer4" -> (N, C, d, h, w) maps (needs equal
            preprocessed shapes, e.g. a fixed ``size``); "stages" -> a dict ``layer1..layer4`` of
            stacked maps.
        batch_size: volumes per forward (consecutive volumes of equal shape are batched).
        device: "cpu", "cuda", "auto" or None (the model's device).
        amp: None (fp32), "bf16" or "fp16" autocast; refused on a CPU without native support
            unless ``force_amp``.
        fast: run the BatchNorm-folded, channels_last_3d copy of the model (same outputs).
        workers: processes that read and preprocess ahead of the forward (``reading.read_ahead``);
            None: half the usable CPUs (at most 8) for files, 0 (this process) for inputs
            already in memory. With spawn or forkserver a callable ``preprocess`` must pickle.
        progress: show a progress bar over the inputs (needs tqdm).
        nan_policy: "error" (an input with NaN or infinite voxels fails, naming the count) or
            "zero" (such voxels are set to 0 before preprocessing).
        convention: the name of a published FID convention (``med3d fid --list-conventions``),
            whose preprocessing replaces ``preprocess`` (the model must be of its architecture).

    Raises ``FeatureExtractionError`` naming every input that failed (no partial result).
    """
    if convention is not None:
        from .conventions import get_convention

        if preprocess is not None:
            raise UsageError("give preprocess= or convention=, not both: a convention sets the preprocessing")
        preprocess = get_convention(convention).preprocess_for(model)
    results = list(
        iter_features(
            model, inputs, preprocess=preprocess, maps=maps, batch_size=batch_size, device=device,
            amp=amp, force_amp=force_amp, fast=fast, workers=workers, progress=progress, nan_policy=nan_policy,
        )
    )
    failed = [(r.name, r.error) for r in results if not r.ok]
    if failed:
        raise InputsFailedError(failed, len(results), "med3d_hub.inference.features.iter_features")
    return stack_results(results, maps)


def stack_results(results: Sequence[FeatureResult], maps: str = "pooled") -> Features:
    """Stack the features of successful results in their order (failed ones are left out)."""
    maps = _check_maps(maps)
    rows = [r.features for r in results if r.ok]
    if maps == "stages":
        if not rows:
            return {k: np.empty((0,), np.float32) for k in STAGE_NAMES}
        return {k: _stack([row[k] for row in rows], results, k) for k in rows[0]}
    if not rows:
        return np.empty((0,), np.float32)
    return _stack(rows, results, maps)


def _stack(rows: list[np.ndarray], results, what: str) -> np.ndarray:
    shapes = {r.shape for r in rows}
    if len(shapes) > 1:
        sizes = sorted({r.shape for r in results if r.ok and r.shape})
        raise UsageError(
            f"the {what} maps differ in shape ({sorted(shapes)}) because the preprocessed volumes do "
            f"({sizes}); set a fixed size, e.g. preprocess=transforms_for(model, size=(56, 224, 224)), "
            "or use maps='pooled'."
        )
    return np.stack(rows)


def _check_maps(maps: str) -> str:
    if maps not in MAPS:
        raise UsageError(f"unknown maps {maps!r}; choose one of {', '.join(MAPS)}.")
    return maps
