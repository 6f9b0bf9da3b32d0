"""Embeddings and feature maps of volumes: read, preprocess, batch, forward, write.

``extract_features(model, ["a.nii.gz", "b.nii.gz"])`` returns one row per input, in input order.
Underneath, ``iter_features`` yields one ``FeatureResult`` per input (features or an error), so a
caller such as the ``med3d`` command can report and skip an unreadable file without losing the
others.

How the work is arranged:

* Reading and preprocessing run in a small thread pool a few volumes ahead of the network, so file
  I/O and resampling overlap the forward pass instead of adding to it.
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
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from ..data.inputs import InputItem, read_input
from ..data.io import Volume
from ..data.preprocess import Preprocess, transforms_for
from ..errors import Med3DError, UsageError
from .feature_files import OUTPUT_FORMATS, Features, SavedFeatures, check_output, load_features, save_features
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
NAN_POLICIES = ("error", "zero")  # what to do with NaN or infinite voxels in an input

Input = Union[str, os.PathLike, InputItem, Volume, np.ndarray]


class FeatureExtractionError(Med3DError, RuntimeError):
    """Some inputs could not be read or processed; ``failures`` lists ``(name, message)`` pairs."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int):
        self.failures = list(failures)
        lines = "\n".join(f"  {message}" for _, message in self.failures)
        super().__init__(
            f"{len(self.failures)} of {total} input(s) failed:\n{lines}\n"
            "Use med3d_hub.inference.features.iter_features to keep the others and skip these."
        )


@dataclass(frozen=True, eq=False)
class FeatureResult:
    """The outcome for one input: ``features`` or ``error`` (a message that names the input)."""

    index: int  # position in the inputs
    name: str  # the path as given, or "<array i>" / the Volume's source
    features: Features | None = None
    shape: tuple[int, int, int] | None = None  # the preprocessed (D, H, W) the network saw
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


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


def _input_name(item: Any, index: int) -> str:
    if isinstance(item, InputItem):
        return item.name
    if isinstance(item, Volume):
        return item.source
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"<array {index}>"


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


def _finite_first(transform: Callable, nan_policy: str) -> Callable:
    """``transform`` after a check of the input's voxels: NaN or infinite ones are an error, or zeros by request."""

    def checked(source: Any) -> Any:
        array = source.array if isinstance(source, Volume) else source
        if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.inexact):
            return transform(source)
        bad = ~np.isfinite(array)
        count = int(np.count_nonzero(bad))
        if not count:
            return transform(source)
        if nan_policy == "error":
            raise UsageError(
                f"{count:,} of {array.size:,} voxels are NaN or infinite; fix the scan, or pass "
                "--nan-policy zero (nan_policy='zero') to set them to 0"
            )
        array = np.where(bad, np.zeros((), array.dtype), array)
        if isinstance(source, Volume):
            return transform(Volume(array=array, spacing=source.spacing, affine=source.affine, source=source.source))
        return transform(array)

    return checked


def _load(item: Any, name: str, transform: Callable, in_chans: int = 1) -> tuple[torch.Tensor | None, str | None]:
    """Read and preprocess one input; an error becomes a message that names the input."""
    try:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        source = item if isinstance(item, (Volume, np.ndarray)) else read_input(item)
        x = transform(source)
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise UsageError(
                f"the preprocessing returned {getattr(x, 'shape', type(x).__name__)}, "
                f"expected a ({in_chans}, D, H, W) tensor"
            )
        check_channels(x.shape[0], in_chans)
        return x.float(), None
    except (OSError, ValueError) as err:  # FileNotFoundError, VolumeReadError, bad preprocessing
        message = str(err)
    except Exception as err:  # anything else a damaged file can raise deep in a reader
        message = f"{type(err).__name__}: {err}"
    return None, message if name in message else f"{name}: {message}"


def check_channels(channels: int, in_chans: int) -> None:
    """An input of as many channels as the model takes, or an error saying how to give them."""
    if channels != in_chans:
        raise UsageError(
            f"{channels} channel(s), but the model takes {in_chans}: give one file per channel (--channels "
            "FILE,FILE,..., or a CSV with a column per channel) or a 4-D image with --channel all"
            if in_chans > 1 else
            f"{channels} channels, but the model takes one: pick one with --channel N (channel=N)"
        )


def scan_progress_bar(total: int, enabled: bool, desc: str = "features"):
    """A bar over the scans of a run (tqdm, when installed); None when off."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="scan", desc=desc, dynamic_ncols=True, leave=False)


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
    workers: int = 1,
    prefetch: int | None = None,
    progress: bool = False,
    nan_policy: str = "error",
) -> Iterator[FeatureResult]:
    """Yield one ``FeatureResult`` per input, in input order; failures are results, not exceptions.

    Arguments are those of ``extract_features``; ``workers`` threads read and preprocess up to
    ``prefetch`` volumes (default ``batch_size + 2``) ahead of the forward. Errors that concern the
    whole run (a bad model, device or option) are raised before the first input is read.
    """
    maps = _check_maps(maps)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
    _check_model(model, maps)
    if nan_policy not in NAN_POLICIES:
        raise UsageError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}")
    transform = _finite_first(_as_transform(preprocess, model), nan_policy)
    device = resolve_device(device, model)
    amp_dtype = check_amp(amp, device, force=force_amp)
    items = _as_list(inputs)
    names = [_input_name(item, i) for i, item in enumerate(items)]
    return _run(model, items, names, transform, maps, batch_size, device, amp_dtype, fast, workers,
                prefetch if prefetch is not None else batch_size + 2, progress)


def _run(model, items, names, transform, maps, batch_size, device, amp_dtype, fast, workers, prefetch, progress):
    net = _prepare(model, device, fast) if items else None
    bar = scan_progress_bar(len(items), progress)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="med3d-read")
    queue: deque = deque()
    upcoming = iter(range(len(items)))
    pending: list[tuple[int, torch.Tensor]] = []  # one batch of equal-shape volumes

    def refill() -> None:
        while len(queue) < max(prefetch, 1):
            i = next(upcoming, None)
            if i is None:
                return
            queue.append((i, pool.submit(_load, items[i], names[i], transform, getattr(model, "in_chans", 1))))

    def flush() -> Iterator[FeatureResult]:
        if not pending:
            return
        x = torch.stack([t for _, t in pending])
        x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
        shape = tuple(x.shape[2:])
        for (i, _), feats in zip(pending, _forward(net, x, maps, amp_dtype)):
            yield FeatureResult(i, names[i], features=feats, shape=shape)
        pending.clear()

    try:
        refill()
        while queue:
            i, future = queue.popleft()
            refill()  # keep the readers busy while this batch runs
            tensor, error = future.result()
            if error is not None:
                done = list(flush())
                done.append(FeatureResult(i, names[i], error=error))
            else:
                done = list(flush()) if pending and pending[0][1].shape != tensor.shape else []
                pending.append((i, tensor))
                if len(pending) == batch_size:
                    done += list(flush())
            for result in done:
                if bar is not None:
                    bar.update(1)
                yield result
        for result in flush():
            if bar is not None:
                bar.update(1)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
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
    workers: int = 1,
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
        workers: threads that read and preprocess ahead of the forward.
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
        raise FeatureExtractionError(failed, len(results))
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


def _as_list(inputs: Any) -> list:
    if isinstance(inputs, (str, os.PathLike, InputItem, Volume, torch.Tensor)):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 3:
            return [inputs]
        if inputs.ndim == 4:
            return list(inputs)
        raise UsageError(f"an array input must be one (D, H, W) volume or an (N, D, H, W) stack, got {inputs.shape}")
    try:
        return list(inputs)
    except TypeError:
        raise TypeError(f"inputs must be paths, Volumes or arrays (or a list of them), got {type(inputs).__name__}") from None
