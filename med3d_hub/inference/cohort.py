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

from ..data.inputs import InputItem, as_item
from ..errors import UsageError, is_user_error
from .distributed import DistContext
from .feature_scores import FeatureSet, feature_provenance
from .features import iter_features
from .metrics import MeanCovariance
from .parts import PartsFolder, assemble, input_key, run_fingerprint

__all__ = ["CohortRun", "feature_set_of_scans", "features_to_file", "on_main", "predict_masks", "run_provenance", "shard"]


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
    statistics: MeanCovariance | None = None  # with statistics=True: of every row written, the ranks' merged


def shard(indices: Sequence[int], dist: DistContext) -> list[int]:
    """This rank's share: every ``world_size``-th input, so that slow and fast scans spread evenly."""
    return list(indices[dist.rank::dist.world_size])


def on_main(dist: DistContext, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 and give every rank its result; an error there is raised on every rank.

    Rank 0 raises the error itself; the others raise its message (a ``UsageError`` where it was the user's).
    """
    result, error, message = None, None, None
    if dist.is_main:
        try:
            result = work()
        except Exception as raised:  # noqa: BLE001 - said to the other ranks, then raised everywhere
            error, message = raised, (is_user_error(raised), f"rank 0: {raised}")
    result, message = dist.broadcast_object((result, message))
    if error is not None:
        raise error
    if message is not None:
        user, text = message
        raise UsageError(text) if user else RuntimeError(text)
    return result


def features_to_file(
    model: nn.Module,
    inputs: Sequence[str | os.PathLike | InputItem],
    output: str | os.PathLike,
    *,
    preprocess,
    maps: str = "pooled",
    amp: str | None = None,
    seed: int | None = None,
    convention: str | None = None,
    resume: bool = False,
    dist: DistContext | None = None,
    on_failure: Callable[[Any], None] = lambda result: None,
    statistics: bool = False,
    **options: Any,
) -> CohortRun:
    """Features of every input into ``output`` (``.npy``, ``.npz``, ``.csv``, ``.parquet``), through the parts folder.

    ``options`` go to ``iter_features``; ``seed`` (of random weights) and ``convention`` go into the provenance.
    ``on_failure`` is called on the rank that read it with each failed ``FeatureResult``. The parts
    folder is removed once the output is written, unless some inputs failed: then it stays, and
    ``resume=True`` later computes only those. ``statistics`` (pooled): each rank accumulates the
    mean and covariance of its rows, and the ranks' accumulators are merged (``run.statistics``).
    """
    dist = dist or DistContext()
    inputs = [i if isinstance(i, InputItem) else os.fspath(i) for i in inputs]
    provenance = run_provenance(model, preprocess, maps=maps, amp=amp, seed=seed, convention=convention)
    if len(set(dist.all_gather_object(run_fingerprint(provenance)))) > 1:
        raise UsageError("the ranks of this run loaded different models or preprocessing; give every rank the "
                         "same --model, --pretrained and options")
    parts = PartsFolder(output)
    finished = on_main(dist, lambda: (parts.start(provenance, resume), parts.finished())[1])
    keys = [_key(item) for item in inputs]
    todo = [i for i, key in enumerate(keys) if key not in finished]
    mine = shard(todo, dist)
    failed: list[int] = []
    rows = MeanCovariance()
    for result in iter_features(model, [inputs[i] for i in mine], preprocess=preprocess, maps=maps, amp=amp, **options):
        i = mine[result.index]
        if result.ok:
            parts.write(keys[i] or input_key(inputs[i]), result.features, result.name, result.shape)
            if statistics:
                rows.update(result.features[None])
        else:
            failed.append(i)
            on_failure(result)
    if statistics:  # the rows of an earlier run too, shared out as the new ones were
        for i in shard([i for i, key in enumerate(keys) if key in finished], dist):
            rows.update(parts.read(keys[i])[0][None])
    dist.barrier()
    failed = sorted(i for rank in dist.all_gather_object(failed) for i in rank)
    run = CohortRun(inputs=len(inputs), computed=len(todo) - len(failed), resumed=len(inputs) - len(todo),
                    failed=[as_item(inputs[i]).name for i in failed])
    if statistics:
        run.statistics = MeanCovariance()
        for accumulator in dist.all_gather_object(rows):  # in rank order
            run.statistics.merge(accumulator)
    if run.computed + run.resumed == 0:  # every input failed: nothing to keep
        on_main(dist, parts.remove)
        return run

    def finish():
        left_out = set(failed)
        keys_now = [keys[i] or input_key(inputs[i]) for i in range(len(inputs)) if i not in left_out]
        shape, written, _ = assemble(parts, keys_now, _provenance_of(model, preprocess, amp, seed, convention) if maps == "pooled" else None)
        if not failed:
            parts.remove()
        return shape, written

    run.shape, run.written = on_main(dist, finish)
    run.parts = parts.root if failed else None
    return run


def run_provenance(model: nn.Module, preprocess, *, maps: str = "pooled", amp: str | None = None,
                   seed: int | None = None, convention: str | None = None) -> dict:
    """How a run makes its results (``feature_provenance`` before any volume is read, and the maps)."""
    return {**feature_provenance(model, preprocess, volumes=0, feature_dim=model.num_features, amp=amp, seed=seed,
                                 convention=convention), "maps": maps}


def _provenance_of(model, preprocess, amp, seed, convention):
    def provenance_of(volumes: int, feature_dim: int, input_shapes) -> dict:
        return feature_provenance(model, preprocess, volumes=volumes, feature_dim=feature_dim,
                                  input_shapes=input_shapes, amp=amp, seed=seed, convention=convention)
    return provenance_of


def feature_set_of_scans(model: nn.Module, scans: Sequence, output: str | os.PathLike, *, preprocess,
                         source: str, seed: int | None = None, amp: str | None = None, convention: str | None = None,
                         resume: bool = False, dist: DistContext | None = None, **options: Any) -> FeatureSet:
    """Pooled features of every scan of a set, kept in ``output`` (``.npz``); any failed scan is an error.

    A score over the scans that happened to be readable would not be a score of the set, so a failed
    scan stops the command; the features of the others stay in the parts folder, and ``resume`` then
    computes only what is missing. With ``resume`` a finished ``output`` of exactly these scans, made
    this way, is read back instead. The set carries the ranks' merged mean and covariance for the FID.
    """
    from .feature_scores import read_feature_file
    from .features import FeatureExtractionError

    dist = dist or DistContext()
    scans = [s if isinstance(s, InputItem) else os.fspath(s) for s in scans]
    parts = PartsFolder(output)
    if resume and Path(output).is_file() and not parts.root.exists():
        saved = read_feature_file(os.fspath(output))
        fingerprint = run_fingerprint(run_provenance(model, preprocess, amp=amp, seed=seed, convention=convention))
        if saved.names == [as_item(s).name for s in scans] and saved.provenance and run_fingerprint({**saved.provenance, "maps": "pooled"}) == fingerprint:
            return FeatureSet(source, saved.features, saved.names, saved.provenance,
                              statistics=MeanCovariance.of(saved.features))
        raise UsageError(f"--resume: {output} holds other scans or was made another way; delete it to compute "
                         "this set again")
    failures: list[tuple[str, str]] = []
    run = features_to_file(model, scans, output, preprocess=preprocess, maps="pooled", amp=amp, seed=seed,
                           convention=convention, resume=resume, dist=dist, statistics=True,
                           on_failure=lambda result: failures.append((result.name, result.error)), **options)
    failures = [f for rank in dist.all_gather_object(failures) for f in rank]
    if failures:
        raise FeatureExtractionError(failures, len(scans))
    saved = read_feature_file(os.fspath(output))
    return FeatureSet(source, saved.features, saved.names, saved.provenance, statistics=run.statistics)


def _key(item) -> str | None:
    """The input's key, or None when it cannot be read now (it is then tried, and reported, as any input)."""
    try:
        return input_key(item)
    except OSError:
        return None


def predict_masks(predictor, inputs: Sequence, paths: Sequence[Path], *, resume: bool = False,
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
    from .prediction_files import mask_files

    return all(p.is_file() for p in mask_files(path, probabilities))
