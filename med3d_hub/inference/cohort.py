"""A cohort of scans through one command: the inputs shared out over the ranks, each result on disk at once.

``features_to_file`` is ``med3d features`` at any scale. One process, or every process of a
``torchrun`` group (``inference/distributed.py``), takes every ``world_size``-th input still to do,
runs ``iter_features`` over them and writes each result to the parts folder (``inference/parts.py``)
as it comes. Rank 0 then reads the parts back in input order into the output file, so the file is
the one a single process writes, whatever the number of ranks, and a killed run resumes where it
stopped. ``predict_masks`` does the same for ``med3d predict``, where each mask is its own file.

Only rank 0 creates, checks and assembles; what it finds (an error included) is shared with the other
ranks, so every rank stops with the same message instead of waiting on the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UsageError
from .distributed import DistContext
from .feature_scores import feature_provenance
from .features import iter_features
from .parts import PartsFolder, assemble, input_key, run_fingerprint

__all__ = ["CohortRun", "features_to_file", "predict_masks", "shard"]


@dataclass
class CohortRun:
    """What a run did, over all ranks: rows written, inputs computed now and taken from the parts, failures."""

    inputs: int
    written: int = 0
    computed: int = 0
    resumed: int = 0
    failed: list[str] = field(default_factory=list)  # names, in input order
    shape: Any = None
    parts: Path | None = None  # the parts folder kept (some inputs failed), else None


def shard(indices: Sequence[int], dist: DistContext) -> list[int]:
    """This rank's share: every ``world_size``-th input, so that slow and fast scans spread evenly."""
    return list(indices[dist.rank::dist.world_size])


def on_main(dist: DistContext, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 and give every rank its result; an error there is raised on every rank."""
    outcome: tuple[Any, BaseException | None] = (None, None)
    if dist.is_main:
        try:
            outcome = (work(), None)
        except Exception as error:  # noqa: BLE001 - shared with the other ranks, then raised everywhere
            outcome = (None, error)
    result, error = dist.broadcast_object(outcome)
    if error is not None:
        raise error
    return result


def features_to_file(
    model: nn.Module,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    preprocess,
    maps: str = "pooled",
    amp: str | None = None,
    resume: bool = False,
    dist: DistContext | None = None,
    on_failure: Callable[[Any], None] = lambda result: None,
    **options: Any,
) -> CohortRun:
    """Features of every input into ``output`` (``.npy``, ``.npz``, ``.csv``, ``.parquet``), through the parts folder.

    ``options`` go to ``iter_features``. ``on_failure`` is called on the rank that read it with each
    failed ``FeatureResult``. The parts folder is removed once the output is written, unless some
    inputs failed: then it stays, and ``resume=True`` later computes only those.
    """
    dist = dist or DistContext()
    inputs = [os.fspath(i) for i in inputs]
    provenance = {**feature_provenance(model, preprocess, volumes=0, feature_dim=model.num_features, amp=amp),
                  "maps": maps}
    if len(set(dist.all_gather_object(run_fingerprint(provenance)))) > 1:
        raise UsageError("the ranks of this run loaded different models or preprocessing; give every rank the "
                         "same --model, --pretrained and options")
    parts = PartsFolder(output)
    finished = on_main(dist, lambda: (parts.start(provenance, resume), parts.finished())[1])
    keys = [_key(item) for item in inputs]
    todo = [i for i, key in enumerate(keys) if key not in finished]
    mine = shard(todo, dist)
    failed: list[int] = []
    for result in iter_features(model, [inputs[i] for i in mine], preprocess=preprocess, maps=maps, amp=amp, **options):
        i = mine[result.index]
        if result.ok:
            parts.write(keys[i] or input_key(inputs[i]), result.features, result.name, result.shape)
        else:
            failed.append(i)
            on_failure(result)
    dist.barrier()
    failed = sorted(i for rank in dist.all_gather_object(failed) for i in rank)
    run = CohortRun(inputs=len(inputs), computed=len(todo) - len(failed), resumed=len(inputs) - len(todo),
                    failed=[inputs[i] for i in failed])
    if run.computed + run.resumed == 0:  # every input failed: nothing to keep
        on_main(dist, parts.remove)
        return run

    def finish():
        left_out = set(failed)
        keys_now = [keys[i] or input_key(inputs[i]) for i in range(len(inputs)) if i not in left_out]
        shape, written, _ = assemble(parts, keys_now, _provenance_of(model, preprocess, amp) if maps == "pooled" else None)
        if not failed:
            parts.remove()
        return shape, written

    run.shape, run.written = on_main(dist, finish)
    run.parts = parts.root if failed else None
    return run


def _provenance_of(model, preprocess, amp):
    def provenance_of(volumes: int, feature_dim: int, input_shapes) -> dict:
        return feature_provenance(model, preprocess, volumes=volumes, feature_dim=feature_dim,
                                  input_shapes=input_shapes, amp=amp)
    return provenance_of


def _key(item: str) -> str | None:
    """The input's key, or None when it cannot be read now (it is then tried, and reported, as any input)."""
    try:
        return input_key(item)
    except OSError:
        return None


def predict_masks(predictor, inputs: Sequence[str], paths: Sequence[Path], *, resume: bool = False,
                  probabilities: bool = False, dist: DistContext | None = None, **options: Any):
    """Yield ``(input index, Prediction)`` for this rank's share of the inputs whose mask is still to write.

    With ``resume`` an input whose mask and sidecar (and probabilities, when asked for) are all
    there is skipped: each of them is written atomically, so one that exists is whole.
    """
    from .predict import iter_predictions

    dist = dist or DistContext()
    todo = [i for i, path in enumerate(paths) if not (resume and _mask_done(path, probabilities))]
    mine = shard(todo, dist)
    for result in iter_predictions(predictor, [inputs[i] for i in mine], probabilities=probabilities, **options):
        yield mine[result.index], result


def _mask_done(path: Path, probabilities: bool) -> bool:
    stem = path.name.removesuffix(".nii.gz").removesuffix(".npy")
    needed = [path, path.with_name(stem + ".json")] + ([path.with_name(stem + "_probabilities.npz")] if probabilities else [])
    return all(p.is_file() for p in needed)
