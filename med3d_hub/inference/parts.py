"""The parts folder of a long run: each input's result on disk as soon as it is computed.

``features.npz`` is made in ``features.npz.parts/`` beside it: ``run.json`` says how (the run's
provenance and its fingerprint), and each finished input is one small file named by the input's
key (its path, size and modification time), written atomically. A run killed at any instant, even by
SIGKILL, loses only the volumes in flight; ``--resume`` skips the inputs whose part is there, and a run
made another way (other weights, preprocessing, precision) is refused instead of mixing two models
into one file. At the end the parts are read back one at a time, in input order, into the output
(``assemble``) and the folder is removed.

Parts are written by every rank of a torchrun group into one folder (shared storage on several
nodes); only rank 0 creates, checks and removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.inputs import InputItem, as_item
from ..errors import UsageError
from ..files import atomic_write, fsync_dir, read_json
from .feature_files import Features, save_features

__all__ = ["PartsFolder", "assemble", "input_key", "run_fingerprint"]

RUN_FILE = "run.json"
PER_RESULT = ("volumes", "input_shapes")  # provenance fields known only once the run is over


def run_fingerprint(provenance: Mapping[str, Any]) -> str:
    """The one value that says how a run makes its results: what a resumed run must match."""
    fields = {k: v for k, v in provenance.items() if k not in PER_RESULT}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def input_key(entry: str | os.PathLike | InputItem) -> str:
    """An input's identity for resuming: its name (its row's), the absolute path, size and mtime of each of
    its files (every file under a DICOM folder), and the series and channel it reads.

    A scan replaced or touched since its part was written gets a new key and is computed again.
    """
    item = as_item(entry)
    text = [f"name={item.name}", f"series={item.series}", f"channel={item.channel}"]
    for name in item.paths:
        path = Path(name).expanduser().absolute()
        files = sorted(Path(root, f) for root, _, names in os.walk(path) for f in names) if path.is_dir() else [path]
        text += [str(path), *(f"{f.relative_to(path) if f != path else ''}:{st.st_size}:{st.st_mtime_ns}"
                              for f in files for st in [f.stat()])]
    return hashlib.sha256("|".join(text).encode()).hexdigest()[:32]


class PartsFolder:
    """``<output>.parts/``: ``run.json`` and one ``<key>.npz`` per finished input."""

    def __init__(self, output: str | os.PathLike):
        output = Path(output)
        self.output = output
        self.root = output.with_name(output.name + ".parts")

    def start(self, provenance: Mapping[str, Any], resume: bool) -> int:
        """Create the folder, or with ``resume`` check that its run was made the same way; returns the parts there.

        Without ``resume`` an existing folder is refused: it holds an interrupted run's results.
        """
        fingerprint = run_fingerprint(provenance)
        if self.root.exists():
            if not resume:
                raise UsageError(f"{self.root} holds the results of an interrupted run: pass --resume to continue it, "
                                 "or delete the folder to start again")
            previous = read_json(self.root / RUN_FILE)
            if not isinstance(previous, dict) or previous.get("fingerprint") != fingerprint:
                raise UsageError(f"--resume: {self.root} was made another way ({_differences(previous, provenance)}); "
                                 "its results cannot go into one file with this run's. Rerun with the same model, "
                                 "weights and options, or delete the folder to start again")
            return len(self.finished())
        if resume and self.output.exists():
            raise UsageError(f"--resume: {self.output} is already complete (no {self.root.name} folder beside it); "
                             "nothing to resume")
        self.root.mkdir()
        with atomic_write(self.root / RUN_FILE, "w", fsync=True) as handle:
            json.dump({"fingerprint": fingerprint, "provenance": dict(provenance)}, handle, indent=2, default=str)
        return 0

    def path_of(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def finished(self) -> set[str]:
        """The keys of the inputs whose part is on disk."""
        return {p.name[:-4] for p in self.root.glob("*.npz") if not p.name.startswith(".")}

    def write(self, key: str, value: Features, name: str, shape: Sequence[int] | None) -> None:
        """One input's result, durable before the next input is read (a whole file or none)."""
        arrays = dict(value) if isinstance(value, dict) else {"features": np.asarray(value)}
        meta = json.dumps({"name": name, "shape": list(shape) if shape else None})
        with atomic_write(self.path_of(key), fsync=True) as handle:
            np.savez(handle, meta=np.array(meta), **arrays)

    def read(self, key: str) -> tuple[Features, dict]:
        """One part back: its value (an array, or a dict of stage maps) and ``{"name", "shape"}``."""
        with np.load(self.path_of(key), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
        return (arrays["features"] if list(arrays) == ["features"] else arrays), meta

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        fsync_dir(self.root.parent)


def _differences(previous: Any, provenance: Mapping[str, Any]) -> str:
    if not isinstance(previous, dict) or not isinstance(previous.get("provenance"), dict):
        return f"its {RUN_FILE} is missing or unreadable"
    before = previous["provenance"]
    keys = [k for k in sorted(set(before) | set(provenance)) if k not in PER_RESULT
            and json.dumps(before.get(k), sort_keys=True, default=str) != json.dumps(provenance.get(k), sort_keys=True, default=str)]
    return "differs in " + ", ".join(keys) if keys else "another fingerprint"


def assemble(parts: PartsFolder, keys: Sequence[str], provenance_of=None) -> tuple[tuple, int, list[tuple[int, ...]]]:
    """Write ``parts.output`` from the parts of ``keys`` (input order; missing ones are left out), atomically.

    The rows go through a file-backed array in the parts folder, so memory does not grow with the
    number of inputs. ``provenance_of(volumes, feature_dim, input_shapes)`` gives the provenance to
    store (pooled ``.npz``), or None. Returns the shape written, the rows and the input shapes.
    """
    present = [k for k in keys if parts.path_of(k).is_file()]
    if not present:
        raise UsageError(f"no results to write to {parts.output}")
    first, _ = parts.read(present[0])
    firsts = first if isinstance(first, dict) else {"features": first}
    stacks = {}
    for stage, array in firsts.items():
        stacks[stage] = np.lib.format.open_memmap(parts.root / f".assembly-{stage}.npy", mode="w+", dtype=np.float32,
                                                  shape=(len(present), *array.shape))
    names, shapes = [], []
    for row, key in enumerate(present):
        value, meta = parts.read(key)
        values = value if isinstance(value, dict) else {"features": value}
        for stage, stack in stacks.items():
            if values[stage].shape != stack.shape[1:]:
                raise UsageError(f"the {stage} maps of {meta['name']} have shape {values[stage].shape}, those of "
                                 f"{names[0] if names else 'the first input'} {stack.shape[1:]}: set a fixed --size "
                                 "to stack maps, or write pooled features")
            stack[row] = values[stage]
        names.append(meta["name"])
        shapes.append(tuple(meta["shape"] or ()))
    features: Features = stacks["features"] if list(stacks) == ["features"] else stacks
    provenance = None
    if provenance_of is not None and not isinstance(features, dict):
        provenance = provenance_of(len(present), features.shape[1], shapes)
    save_features(parts.output, features, names, provenance=provenance)
    shape = {k: v.shape for k, v in stacks.items()} if isinstance(features, dict) else features.shape
    del features, stacks
    for stage in firsts:  # the parts stay where some inputs failed; the copy of the rows does not
        (parts.root / f".assembly-{stage}.npy").unlink(missing_ok=True)
    return shape, len(present), shapes
