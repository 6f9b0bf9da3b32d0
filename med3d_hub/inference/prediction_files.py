"""The files ``med3d predict`` writes: a mask per scan (with its label names), a table per run.

A segmentation's mask is a uint8 NIfTI on the scan's own grid (its affine and header), named after
the scan, beside a sidecar JSON of the label names and, on request, float16 probability maps; a
classification is one CSV or Parquet table of class probabilities. Every file is written to a
temporary name and renamed, so nothing is ever half-written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.inputs import output_stem
from ..errors import MissingFileError, UsageError
from ..files import atomic_write

if TYPE_CHECKING:
    from .predict import Prediction

__all__ = ["TABLE_FORMATS", "check_table_output", "mask_path", "write_mask", "write_table"]

TABLE_FORMATS = (".csv", ".parquet")


def mask_path(name: str, folder: str | os.PathLike, kind: str) -> Path:
    """``masks/ct_001.nii.gz`` for ``ct/ct_001.nii.gz`` (or ``.nrrd``, ``.mha``) or a DICOM folder ``ct_001/``,
    ``masks/ct_1.2.3.nii.gz`` for series ``1.2.3`` of a folder ``ct/`` of several; ``.npy`` for arrays."""
    stem = output_stem(name)
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
