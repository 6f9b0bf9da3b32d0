"""The one preprocessing cache of training data, shared by segmentation tasks and labelled volumes.

A source (an MSD task folder, a label CSV) gets a folder ``<root>/<name>-<digest of its path>``;
inside it, one folder per preprocessing setting, ``pre-<digest of the settings>``. A case there is
its arrays (``<case_id><suffix>``) and ``<case_id>.json`` (``{"key": ...}``), written last: the
commit, so a reader sees a whole case or none. The key holds the settings and the source files'
fingerprints (path, size, modification time): a changed file or setting rebuilds the case.

Every rank fills its share of the cases, then what it still lacks (ranks on other nodes may not
share the folder), and all ranks end with the same list of failures. Unusable cases are reported
all at once (``report_bad``): an error that lists them, or with ``--skip-bad-cases`` a warning each.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import Med3DError
from ..files import atomic_write, read_json
from ..inference.distributed import DistContext

__all__ = ["BadCaseWarning", "DataError", "cache_root", "default_cache_dir", "fill_everywhere", "fingerprint",
           "is_cached", "report_bad", "save_case", "settings_folder", "source_folder"]


class DataError(Med3DError, ValueError):
    """A data folder, file or case cannot be used; the message names the file."""


class BadCaseWarning(UserWarning):
    """A case skipped because of ``--skip-bad-cases``."""


def default_cache_dir() -> Path:
    """The ``train/`` folder of the package's one cache root (``$MED3D_HUB_CACHE``, else ``$HF_HOME/med3d_hub``)."""
    from ..weights.hub import cache_root as package_cache_root

    return package_cache_root() / "train"


def cache_root(cache_dir: str | None) -> Path:
    """The run's ``cache_dir``, else the default."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def source_folder(root: Path, name: str, source: Path) -> Path:
    """The cache folder of one source (task folder or CSV), named so that a person recognises it."""
    return root / f"{name}-{_digest(str(Path(source).expanduser().resolve()), 10)}"


def settings_folder(folder: Path, settings: dict) -> Path:
    """The folder of one preprocessing setting inside a source's folder."""
    return folder / f"pre-{_digest(json.dumps(settings, sort_keys=True), 12)}"


def fingerprint(path: Path) -> list:
    """Path, size and modification time of a file, or of a DICOM folder's files together."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve()), len(files), sum(p.stat().st_size for p in files),
                max((p.stat().st_mtime_ns for p in files), default=0)]
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def is_cached(folder: Path, case_id: str, key: dict, arrays: tuple[str, ...]) -> bool:
    """True when the case's record has this key and every one of its arrays is there."""
    meta = read_json(folder / f"{case_id}.json")
    return meta is not None and meta.get("key") == key and all((folder / f"{case_id}{a}").is_file() for a in arrays)


def save_case(folder: Path, case_id: str, arrays: dict[str, np.ndarray], record: dict) -> None:
    """Write a case's arrays, then its record (the commit): a reader sees a whole case or none."""
    for suffix, array in arrays.items():
        with atomic_write(folder / f"{case_id}{suffix}") as f:
            np.save(f, array, allow_pickle=False)
    write_json(folder / f"{case_id}.json", record)


def forget_case(folder: Path, case_id: str) -> None:
    """Drop a case's record before its arrays are rewritten: they no longer match it."""
    (folder / f"{case_id}.json").unlink(missing_ok=True)


def write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f)


def fill_everywhere(ctx: DistContext, count: int, fill: Callable[[Iterable[int]], dict[int, str]]) -> dict[int, str]:
    """Run ``fill(indices) -> {index: error}`` over ``range(count)`` on every rank; the failures of all.

    Each rank fills its share first, then what it still lacks, so that every rank ends with a
    complete cache and the same list of failures.
    """
    failures: dict[int, str] = {}
    for part in ctx.all_gather_object(fill(range(ctx.rank, count, ctx.world_size))):
        failures.update(part)
    failures.update(fill(k for k in range(count) if k not in failures))
    merged: dict[int, str] = {}
    for part in ctx.all_gather_object(failures):
        merged.update(part)
    return merged


def report_bad(problems: list[str], skip: bool, noun: str, source: str = "") -> None:
    """Every unusable ``noun`` (case, row) at once: one error listing them, or with ``skip`` a warning each."""
    if not problems:
        return
    of = f" of {source}" if source else ""
    if skip:
        for problem in problems:
            warnings.warn(f"skipping a bad {noun}{of}: {problem}", BadCaseWarning, stacklevel=3)
        return
    shown = "\n".join(f"  {p}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise DataError(
        f"{source + ': ' if source else ''}{len(problems)} bad {noun}(s) found while checking the data:\n{shown}{more}\n"
        "Fix or remove them, or pass --skip-bad-cases to train without them."
    )
