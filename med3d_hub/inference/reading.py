"""The one reading pipeline of ``features``, ``fid`` and ``predict``: inputs read and preprocessed ahead of the network.

``read_ahead(items, transform)`` yields one ``Loaded`` per input, in input order: the preprocessed
(1, D, H, W) float32 tensor and what the rest of the run needs to know about the scan once its
voxels are gone (``Scan``: its source, kind, grid and the ``Grid`` of its preprocessing), or an
error that names the input. How:

* ``workers`` processes (torch's ``DataLoader``) read and preprocess, so decompression, resampling
  and percentiles scale with the cores instead of sharing one interpreter. ``workers=0`` does the
  work in this process (the default when every input is already in memory).
* At most ``workers * PER_WORKER`` volumes are in flight, whatever the number of inputs.
* On CUDA the tensors arrive in pinned memory and ``to_device`` copies them without blocking.
* A volume read from a file belongs to the pipeline, so its float32 array is preprocessed in
  place (``Preprocess.apply(inplace=True)``); arrays and ``Volume`` objects of the caller are copied.
* A failure is a result, not an exception: its message names the input (``failure_message``), and
  ``InputsFailedError`` reports every failed input of a call that needs them all.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.inputs import InputItem, as_item, read_input
from ..data.io import Volume
from ..data.preprocess import Grid, Preprocess
from ..errors import Med3DError, UsageError

__all__ = [
    "NAN_POLICIES", "PER_WORKER", "Input", "InputResult", "InputsFailedError", "Loaded", "Scan", "as_list", "check_channels",
    "check_reading", "default_workers", "failure_message", "input_name", "read_ahead", "scan_progress_bar", "to_device",
]

Input = Union[str, os.PathLike, InputItem, Volume, np.ndarray, torch.Tensor]
_FILES = (str, os.PathLike, InputItem)  # inputs the pipeline reads (the others are in memory already)
NAN_POLICIES = ("error", "zero")  # what to do with NaN or infinite voxels in an input
PER_WORKER = 2  # volumes a worker may have read ahead: one being read, one waiting for the network


class InputsFailedError(Med3DError, RuntimeError):
    """Some inputs could not be read or processed; ``failures`` lists ``(name, message)`` pairs."""

    def __init__(self, failures: Sequence[tuple[str, str]], total: int, keep_going: str = "iter_features"):
        self.failures = list(failures)
        lines = "\n".join(f"  {message}" for _, message in self.failures)
        super().__init__(f"{len(self.failures)} of {total} input(s) failed:\n{lines}\n"
                         f"Use {keep_going} to keep the others and skip these.")


class InputResult:
    """The outcome for one input, of any pipeline: ``ok`` unless it has an ``error`` that names the input."""

    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Scan:
    """What is known of an input once it is read: enough to put a result back on its grid."""

    source: str  # the file (of the first channel) it was read from, or "<array i>" / the Volume's source
    kind: str  # "nifti", "dicom", "image" (NRRD, MetaImage) or "array": how the (first channel) was stored
    shape: tuple[int, int, int]  # canonical (D, H, W)
    spacing: tuple[float, float, float]
    affine: np.ndarray  # canonical voxel -> RAS+ mm
    grid: Grid | None  # the steps of a ``Preprocess``; None for another callable


@dataclass(frozen=True, eq=False)
class Loaded:
    """One input after the reader: the network's tensor and its ``Scan``, or an ``error`` naming it."""

    index: int
    name: str
    x: torch.Tensor | None = None
    scan: Scan | None = None
    error: str | None = None

    def pin_memory(self) -> Loaded:  # called by the DataLoader's pinning thread on CUDA
        return self if self.x is None else dataclasses.replace(self, x=self.x.pin_memory())


# -- the inputs -------------------------------------------------------------------------------------


def as_list(inputs: Any) -> list:
    """One input or many, as a list: a (N, D, H, W) array is N volumes."""
    if isinstance(inputs, (*_FILES, Volume, torch.Tensor)):
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


def input_name(item: Any, index: int) -> str:
    if isinstance(item, InputItem):
        return item.name
    if isinstance(item, Volume):
        return item.source
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"<array {index}>"


def failure_message(name: str, message: str) -> str:
    """The one form of a failed input's message: it names the input."""
    return message if name in message else f"{name}: {message}"


def default_workers(items: Sequence = ()) -> int:
    """Half the CPUs this process may use (at most 8); 0 when every input is already in memory."""
    if items and not any(isinstance(item, _FILES) for item in items):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // 2))


def check_reading(transform: Callable, workers: int | None, nan_policy: str) -> None:
    """The options of a reading pipeline, checked before any input is read."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise UsageError(f"workers must be an integer >= 0, got {workers!r}")
    if nan_policy not in NAN_POLICIES:
        raise UsageError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}")
    if workers != 0 and multiprocessing.get_start_method() != "fork":  # spawn/forkserver pickle the reader
        try:
            pickle.dumps(transform)
        except Exception as err:
            raise UsageError(
                f"the preprocessing {transform!r} cannot be sent to worker processes ({err}); pass a "
                "Preprocess or a module-level function, or workers=0 to preprocess in this process"
            ) from None


# -- one input, in a worker -------------------------------------------------------------------------


def check_channels(channels: int, in_chans: int) -> None:
    """An input of as many channels as the model takes, or an error saying how to give them."""
    if channels != in_chans:
        raise UsageError(
            f"{channels} channel(s), but the model takes {in_chans}: give one file per channel (--channels "
            "FILE,FILE,..., or a CSV with a column per channel) or a 4-D image with --channel all"
            if in_chans > 1 else
            f"{channels} channels, but the model takes one: pick one with --channel N (channel=N)"
        )


def _slabs(array: np.ndarray) -> Iterator[np.ndarray]:
    """The 2-D slabs of a ([C,] D, H, W) array, as views."""
    for volume in array if array.ndim == 4 else (array,):
        yield from volume


def _finite(array: np.ndarray, nan_policy: str, owned: bool) -> np.ndarray:
    """``array``, checked for NaN and infinite voxels slab by slab (no full-size mask): an error, or zeros."""
    if not np.issubdtype(array.dtype, np.inexact):
        return array
    count = sum(int(np.count_nonzero(~np.isfinite(slab))) for slab in _slabs(array))
    if not count:
        return array
    if nan_policy == "error":
        raise UsageError(
            f"{count:,} of {array.size:,} voxels are NaN or infinite; fix the scan, or pass "
            "--nan-policy zero (nan_policy='zero') to set them to 0"
        )
    if not (owned and array.flags.writeable):
        array = array.copy()
    for slab in _slabs(array):
        slab[~np.isfinite(slab)] = 0
    return array


def load(item: Any, index: int, name: str, transform: Callable, nan_policy: str = "error", in_chans: int = 1) -> Loaded:
    """Read (``data/inputs.read_input``) and preprocess one input; any error becomes a ``Loaded`` naming the input."""
    try:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        owned = isinstance(item, _FILES)
        if isinstance(item, np.ndarray):
            if item.ndim != 3:
                raise UsageError(f"an array input must be one (D, H, W) volume, got shape {item.shape}")
            volume = Volume(item, (1.0, 1.0, 1.0), np.eye(4), name)
        else:
            volume = item if isinstance(item, Volume) else read_input(item)
        array = _finite(volume.array, nan_policy, owned)
        if array is not volume.array:  # the NaN set to zero in a copy, which is ours
            owned, volume = True, Volume(array, volume.spacing, volume.affine, volume.source)
        source = array if isinstance(item, np.ndarray) else volume  # a callable gets what it was given
        if isinstance(transform, Preprocess):
            x, grid = transform.apply(source, inplace=owned)
        else:
            x, grid = transform(source), None
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise UsageError(
                f"the preprocessing returned {getattr(x, 'shape', type(x).__name__)}, "
                f"expected a ({in_chans}, D, H, W) tensor"
            )
        check_channels(x.shape[0], in_chans)
        kind = as_item(item).kind if isinstance(item, _FILES) else "array"
        scan = Scan(volume.source, kind, volume.shape, volume.spacing, volume.affine, grid)
        return Loaded(index, name, x.float(), scan)
    except (OSError, ValueError) as err:  # FileNotFoundError, VolumeReadError, bad preprocessing
        message = str(err)
    except Exception as err:  # anything else a damaged file can raise deep in a reader
        message = f"{type(err).__name__}: {err}"
    return Loaded(index, name, error=failure_message(name, message))


class _Reader(Dataset):
    """Input i, read and preprocessed (in a worker process when there are workers)."""

    def __init__(self, items: list, names: list[str], transform: Callable, nan_policy: str, in_chans: int):
        self.items, self.names, self.transform = items, names, transform
        self.nan_policy, self.in_chans = nan_policy, in_chans

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Loaded:
        return load(self.items[i], i, self.names[i], self.transform, self.nan_policy, self.in_chans)


# -- the pipeline -----------------------------------------------------------------------------------


def read_ahead(items: list, transform: Callable, *, workers: int | None = None, nan_policy: str = "error",
               device: torch.device | None = None, names: list[str] | None = None, in_chans: int = 1) -> Iterator[Loaded]:
    """One ``Loaded`` per input, in input order, read by ``workers`` processes ahead of the caller.

    ``in_chans``: the channels the network takes (an input with another count fails). ``device``: a
    CUDA device has the tensors pinned for ``to_device``. The workers start at the
    first ``next`` and stop when the stream ends or is closed.
    """
    if not items:
        return
    names = names if names is not None else [input_name(item, i) for i, item in enumerate(items)]
    workers = min(default_workers(items) if workers is None else workers, len(items))
    loader = DataLoader(_Reader(items, names, transform, nan_policy, in_chans), batch_size=None, num_workers=workers,
                        prefetch_factor=PER_WORKER if workers else None,
                        pin_memory=device is not None and device.type == "cuda")
    yield from loader


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (pinned, on CUDA) tensor on ``device``: a copy that does not block the host on CUDA."""
    return x.to(device, non_blocking=device.type == "cuda")


def scan_progress_bar(total: int, enabled: bool, desc: str = "features"):
    """A bar over the scans of a run (tqdm, when installed); None when off."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="scan", desc=desc, dynamic_ncols=True, leave=False)
