"""Feature files: ``save_features`` writes ``.npy``, ``.npz`` (features plus the input names and, when
given, their provenance as JSON), ``.csv`` or ``.parquet`` atomically (a temporary file in the same
folder, then ``os.replace``); ``load_features`` reads ``.npz`` and ``.npy`` back without unpickling
anything; ``check_output`` refuses an output that cannot be written before any work is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import MissingFileError, UnwritableError, UsageError
from ..files import atomic_write

__all__ = ["OUTPUT_FORMATS", "SavedFeatures", "check_output", "load_features", "save_features"]

OUTPUT_FORMATS = (".npy", ".npz", ".csv", ".parquet")
Features = Union[np.ndarray, dict]  # pooled (N, C) rows, or a dict of stage maps


def save_features(path: str | os.PathLike, features: Features, names: Sequence[str] | None = None,
                  provenance: Mapping[str, Any] | None = None) -> Path:
    """Write features atomically; the format follows the suffix.

    ``.npy``: the array alone. ``.npz``: ``features`` (or ``layer1..layer4`` for stage maps),
    ``files``, the input names, row for row, and ``provenance``, a JSON object saying how the
    features were made (see ``med3d_hub.inference.feature_scores.feature_provenance``). ``.csv`` /
    ``.parquet``: pooled (N, C) features only, one row per input with a ``file`` column then
    ``f0 .. f{C-1}``. Only ``.npz`` keeps the provenance.
    """
    path = Path(path)
    suffix = _output_suffix(path)
    n = len(next(iter(features.values()))) if isinstance(features, dict) else len(features)
    if names is not None and len(names) != n:
        raise UsageError(f"{len(names)} names for {n} rows of features")
    names = list(names) if names is not None else [str(i) for i in range(n)]
    if isinstance(features, dict) and suffix != ".npz":
        raise UsageError(f"stage maps are several arrays; write them to a .npz file, not {suffix}")
    if suffix in (".csv", ".parquet") and np.ndim(features) != 2:
        raise UsageError(
            f"{suffix} holds one row per input, so only pooled (N, C) features fit; "
            f"these have shape {np.shape(features)}: write .npy or .npz"
        )
    if not path.parent.is_dir():
        raise MissingFileError(f"cannot write {path}: the folder {path.parent} does not exist")
    if suffix == ".parquet":
        _parquet_libraries()

    def write(handle) -> None:
        if suffix == ".npy":
            np.save(handle, np.asarray(features), allow_pickle=False)
        elif suffix == ".npz":
            arrays = dict(features) if isinstance(features, dict) else {"features": np.asarray(features)}
            if provenance is not None:
                arrays["provenance"] = np.array(json.dumps(provenance, sort_keys=True))
            np.savez(handle, files=np.array(names, dtype=str), **arrays)
        elif suffix == ".csv":
            _write_csv(handle, np.asarray(features), names)
        else:
            _parquet_frame(np.asarray(features), names).to_parquet(handle, index=False)

    with atomic_write(path, fsync=True) as handle:
        write(handle)
    return path


@dataclass(frozen=True, eq=False)
class SavedFeatures:
    """Features read back from a file: the (N, C) array, the input names and the provenance (or None)."""

    features: np.ndarray
    names: list[str]
    provenance: dict | None
    path: Path


def load_features(path: str | os.PathLike) -> SavedFeatures:
    """Read pooled features written by ``save_features`` (``.npz`` or ``.npy``); nothing is unpickled."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise UsageError(f"{path}: read features from the .npz (or .npy) that `med3d features` writes, not {suffix or 'this file'}")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such features file")
    try:
        if suffix == ".npy":
            return SavedFeatures(np.load(path, allow_pickle=False), [], None, path)
        with np.load(path, allow_pickle=False) as data:
            if "features" not in data:
                raise UsageError(f"{path}: no 'features' array (stage maps? write pooled features for scoring)")
            features = data["features"]
            names = [str(n) for n in data["files"]] if "files" in data else []
            provenance = json.loads(str(data["provenance"])) if "provenance" in data else None
    except (OSError, ValueError, KeyError) as err:
        if str(path) in str(err):
            raise
        raise UsageError(f"{path}: not a readable features file ({err})") from None
    return SavedFeatures(features, names, provenance, path)


def check_output(path: str | os.PathLike, maps: str = "pooled", inputs: Iterable[Any] = ()) -> Path:
    """Check before a long run that ``path`` can take these features: type, folder, writable, not an input, libraries.

    Also removes temporary files an interrupted write to ``path`` left behind (see ``files.atomic_write``).
    """
    path = Path(path)
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and _same_file(path, Path(item)):
            raise UsageError(f"the output {path} is the input {os.fspath(item)}: writing it would destroy the scan; "
                             "choose another output file")
    suffix = _output_suffix(path)
    if maps == "stages" and suffix != ".npz":
        raise UsageError(f"--maps stages gives several arrays; write them to a .npz file, not {suffix}")
    if maps != "pooled" and suffix in (".csv", ".parquet"):
        raise UsageError(f"{suffix} holds one row per input, so only pooled features fit; write .npy or .npz")
    if not path.parent.is_dir():
        raise MissingFileError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder; give a file name such as {path / 'features.npz'}")
    try:
        with tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise UnwritableError(f"cannot write {path}: the folder {path.parent} is not writable ({error.strerror or error})") from None
    _remove_stale_temporaries(path)
    if suffix == ".parquet":
        _parquet_libraries()
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, through links and relative parts (False when either does not exist)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


STALE_OUTPUT_S = 3600.0  # a temporary output untouched this long was left by a killed run


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.*.tmp`` files next to ``path`` that a killed run left (untouched for an hour)."""
    import glob
    import time

    cutoff = time.time() - STALE_OUTPUT_S
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _output_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output type {path.name!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    return suffix


def _parquet_libraries():
    try:
        import pandas as pd
        import pyarrow  # noqa: F401  (pandas' parquet engine)
    except ImportError as err:
        raise UsageError(
            f"writing .parquet needs pandas and pyarrow ({err.name} is missing): "
            "pip install pandas pyarrow, or write .npz or .csv"
        ) from None
    return pd


def _write_csv(handle, features: np.ndarray, names: list[str]) -> None:
    import csv
    import io

    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(["file", *(f"f{j}" for j in range(features.shape[1]))])
    for name, row in zip(names, features):
        writer.writerow([name, *(repr(float(v)) for v in row)])  # repr: exact float round trip
    text.flush()
    text.detach()


def _parquet_frame(features: np.ndarray, names: list[str]):
    pd = _parquet_libraries()
    frame = pd.DataFrame(features, columns=[f"f{j}" for j in range(features.shape[1])])
    frame.insert(0, "file", names)
    return frame
