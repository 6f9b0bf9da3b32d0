"""The inputs a user names, turned into the items a command reads: a scan, a DICOM series, or a case of channels.

An entry of the input list is not always one volume. A DICOM folder may hold several series (in
sub-folders too: the ``dicom_dir/`` of a study); a 4-D image holds channels; a multi-channel case
is one file per channel. ``expand_inputs`` turns the entries into ``InputItem``s, each with the
name its row or mask takes and what to read; ``read_input`` reads one into a ``Volume``.
``read_case_table`` reads a CSV with one column per channel and one row per case.

Names: a file or a folder of one series keeps the path as given; each series of a folder holding
several is ``<its folder>#<SeriesInstanceUID>``; a case of several files is named after its first
file (or the CSV's ``name`` column). ``output_stem`` makes a file name of it (``#`` -> ``_``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .io import (
    ALL_CHANNELS, ITK_SUFFIXES, NIFTI_SUFFIXES, SCAN_SUFFIXES, Volume, dicom_series, read_channels, read_volume,
)

__all__ = ["InputItem", "as_item", "expand_inputs", "input_channels", "output_stem", "read_case_table", "read_input"]


@dataclass(frozen=True)
class InputItem:
    """One thing to read: ``paths`` (one file or folder, or one per channel), a DICOM ``series``, a ``channel``.

    ``channel``: None (a 3-D volume), N (volume N of a 4-D image) or ``"all"`` (every volume, as channels).
    """

    name: str
    paths: tuple[str, ...]
    series: str | None = None
    channel: int | str | None = None

    @property
    def path(self) -> str:
        """The file or folder of the (first) channel: the grid a mask is written on."""
        return self.paths[0]

    @property
    def kind(self) -> str:
        """How the (first) channel is stored: "dicom", "nifti", "image" (NRRD, MetaImage) or "array"."""
        name = self.path.lower()
        if name.endswith(NIFTI_SUFFIXES):
            return "nifti"
        if name.endswith(ITK_SUFFIXES):
            return "image"
        return "array" if name.endswith(".npy") or not os.path.isdir(self.path) else "dicom"


def as_item(entry: str | os.PathLike | InputItem) -> InputItem:
    """A path as an item named by the path as given; an item stays as it is."""
    if isinstance(entry, InputItem):
        return entry
    path = os.fspath(entry)
    return InputItem(path, (path,))


def read_input(entry: str | os.PathLike | InputItem) -> Volume:
    """Read one input: a (D, H, W) ``Volume``, or (C, D, H, W) for several channels."""
    item = as_item(entry)
    if len(item.paths) > 1:
        return read_channels(item.paths, series=item.series)
    return read_volume(item.path, channel=item.channel, series=item.series)


def input_channels(entry: str | os.PathLike | InputItem) -> int:
    """How many channels an input gives; ``channel="all"`` reads the image to count them."""
    item = as_item(entry)
    if len(item.paths) > 1:
        return len(item.paths)
    return read_input(item).channels if item.channel == ALL_CHANNELS else 1


def expand_inputs(entries: Iterable[str | os.PathLike | InputItem | Sequence[str]], *, series: str | None = None,
                  channel: int | str | None = None) -> list[InputItem]:
    """The items of the user's entries, in order: a path, a list of paths (one case, one file per channel),
    or an ``InputItem`` (kept). A folder gives one item per DICOM series under it (found in sub-folders
    too), and the name of one, ``<folder>#<UID>``, reads that series again; ``series`` picks one;
    ``channel`` applies to every file."""
    items: list[InputItem] = []
    for entry in entries:
        if isinstance(entry, InputItem):
            items.append(entry)
        elif isinstance(entry, (str, os.PathLike)):
            items += _items_of(os.fspath(entry), series, channel)
        else:
            paths = tuple(os.fspath(p) for p in entry)
            if not paths:
                raise UsageError("a case of channels names no files")
            items.append(InputItem(paths[0], paths, series, None if len(paths) > 1 else channel))
    return items


def _items_of(path: str, series: str | None, channel) -> list[InputItem]:
    folder, _, uid = path.rpartition("#")
    if uid and not os.path.exists(path) and os.path.isdir(folder):  # a series' name given back as an input
        return [InputItem(path, (folder,), uid, channel)]
    if not os.path.isdir(path):
        return [InputItem(path, (path,), None, channel)]
    if series is not None:
        return [InputItem(f"{path.rstrip('/')}#{series}", (path,), series, channel)]
    found = _series_in(path)
    if len(found) <= 1:  # one series (or none: read_volume says so), named by the folder as given
        return [InputItem(path, (path,), found[0][0] if found else None, channel)]
    return [InputItem(f"{_display(where, path)}#{uid}", (str(where),), uid, channel) for uid, where in found]


def _series_in(path: str) -> list[tuple[str, Path]]:
    """The series under a folder; an unreadable folder is left for read_volume to report per input."""
    from .io import VolumeReadError

    try:
        return dicom_series(path)
    except VolumeReadError:
        return []


def _display(where: Path, given: str) -> str:
    """A series' folder spelled from the folder the user gave (``study/`` -> ``study/ct``)."""
    relative = os.path.relpath(where, given)
    return given.rstrip("/") if relative == "." else os.path.join(given, relative)


def read_case_table(path: str | os.PathLike) -> list[InputItem]:
    """A CSV with a header and one row per case: a column per channel (files, in column order) and an
    optional ``name`` column. Relative paths are taken from the CSV's folder, as for training CSVs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read it as UTF-8 text ({getattr(err, 'strerror', None) or err})") from None
    rows = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise UsageError(f"{path}: needs a header (one column per channel, optionally 'name') and one row per case")
    header = [cell.strip() for cell in rows[0]]
    name_column = next((i for i, h in enumerate(header) if h.lower() == "name"), None)
    channels = [i for i in range(len(header)) if i != name_column]
    if not channels:
        raise UsageError(f"{path}: the header {header} names no channel column")
    items = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
        if len(row) > len(header) or any(not cells[i] for i in channels):
            raise UsageError(f"{path}, line {line}: expected a file in each of the columns {[header[i] for i in channels]}, "
                             f"got {row}")
        files = tuple(os.path.join(path.parent, cells[i]) if path.parent != Path() else cells[i] for i in channels)
        name = cells[name_column] if name_column is not None and cells[name_column] else files[0]
        items.append(InputItem(name, files))
    return items


def output_stem(name: str) -> str:
    """The file name an output is called after: ``ct/a.nii.gz`` -> ``a``, ``study/ct#1.2.3`` -> ``ct_1.2.3``."""
    stem = Path(name.rstrip("/\\")).name
    for ext in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return stem.replace("#", "_")
