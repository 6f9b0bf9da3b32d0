"""Score two sets of scans (or saved features) with FID, KID and MMD, and say how the score was made.

A feature score is only comparable with another made the same way: same weights, layer, pooling,
preprocessing, input size and FID estimator. So every feature set carries a *provenance*
(``feature_provenance``) and its *fingerprint*, one short hash of the fields that change the
features (``fingerprint``); ``med3d features`` writes both into its ``.npz``, two sets whose
fingerprints differ are refused (``check_comparable``) unless forced, and the report
(``score_sets``) carries the score's fingerprint (the sets' plus the volumes per set) beside the
readable provenance. A published convention (``conventions.py``) is one set of these fields.

The math lives in ``med3d_hub.inference.metrics``; reading and the network in ``med3d_hub.inference.features``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .. import __version__
from ..data.io import SCAN_SUFFIXES
from ..data.preprocess import Preprocess
from .conventions import DEFAULT_CONVENTION, get_convention
from ..errors import UsageError
from ..weights.pretrained_cfg import has_weights
from . import metrics
from .features import FeatureExtractionError, iter_features, load_features

__all__ = [
    "FeatureSet",
    "ProvenanceMismatch",
    "check_comparable",
    "feature_provenance",
    "features_of_scans",
    "fingerprint",
    "parameters_sha256",
    "provenance_differences",
    "read_feature_file",
    "score_sets",
    "split_sets",
    "summary_lines",
]

# Provenance fields that change the number; the fingerprint is their hash. Older files lack "estimator".
MUST_MATCH = ("model", "weights", "weights_sha256", "parameters_sha256", "layer", "pooling", "preprocess",
              "input_size", "precision", "feature_dim", "estimator")
DEFAULTS = {"estimator": "eigen"}
FINGERPRINT_CHARS = 16
FEATURE_FILES = (".npz", ".npy")


class ProvenanceMismatch(UsageError):
    """Two feature sets were made differently; their distance would measure the difference in method."""


@dataclass
class FeatureSet:
    """Pooled features of one set of volumes, where they came from, and how they were made."""

    source: str
    features: np.ndarray
    names: list[str]
    provenance: dict | None


# -- provenance -------------------------------------------------------------------------------------


def parameters_sha256(model: nn.Module) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes, bytes, in name order).

    It identifies the exact network, also for random weights, where there is no file to hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fingerprint(provenance: dict | None, volumes: Sequence[int] | None = None) -> str:
    """One short hash of everything in a provenance that changes the number (``MUST_MATCH``).

    With ``volumes`` (the volumes per set) it is a score's fingerprint: the FID depends on N too.
    Two feature sets, or two scores, are comparable exactly when their fingerprints match.
    """
    fields = {key: _plain((provenance or {}).get(key, DEFAULTS.get(key))) for key in MUST_MATCH}
    if volumes is not None:
        fields["volumes"] = [int(n) for n in volumes]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def feature_provenance(model: nn.Module, preprocess: Preprocess, *, volumes: int, feature_dim: int,
                       input_shapes: Sequence[Sequence[int]] = (), amp: str | None = None,
                       seed: int | None = None, convention: str | None = None) -> dict[str, Any]:
    """How pooled features were made: everything needed to make comparable ones again, and its fingerprint.

    This is the one description of a feature run; anything that keys on "the same run" uses it.
    """
    conv = get_convention(convention or DEFAULT_CONVENTION)
    cfg = model.pretrained_cfg if has_weights(model) else None
    arch = cfg.get("architecture") if cfg else None
    if not arch:
        from ..networks.registry import architecture_of

        arch = architecture_of(model.block, model.layers) or type(model).__name__
    if cfg:
        weights = cfg.get("name") or arch
        where = cfg.get("file") or (f"hf://{cfg['hf_hub_id']}@{cfg.get('revision') or 'main'}/{cfg.get('filename')}"
                                    if cfg.get("hf_hub_id") else None)
    else:
        weights, where = "random" + (f" (torch.manual_seed({seed}))" if seed is not None else ""), None
    provenance = {
        "package": "med3d-hub",
        "convention": conv.name,
        "version": __version__,
        "model": arch,
        "weights": weights,
        "weights_file": where,
        "weights_sha256": cfg.get("sha256") if cfg else None,
        "parameters_sha256": parameters_sha256(model),
        "layer": conv.layer,
        "pooling": {"avg": "global average (adaptive_avg_pool3d to 1x1x1)"}[conv.pooling],
        "preprocess": preprocess.to_dict(),
        "input_size": list(preprocess.size) if preprocess.size else None,
        "input_shapes": sorted({tuple(int(v) for v in s) for s in input_shapes}),
        "precision": amp or "fp32",
        "feature_dim": int(feature_dim),
        "estimator": conv.estimator,
        "volumes": int(volumes),
    }
    provenance["fingerprint"] = fingerprint(provenance)
    return provenance


def provenance_differences(first: dict | None, second: dict | None) -> list[str]:
    """What differs between two provenances, one line per field that changes the number (to explain a mismatch)."""
    if first is None or second is None:
        missing = "both sets" if first is None and second is None else ("the first set" if first is None else "the second set")
        return [f"{missing} carry no provenance (.npy, or an .npz from an older med3d features)"]
    lines = []
    for key in MUST_MATCH:
        a, b = (_plain(p.get(key, DEFAULTS.get(key))) for p in (first, second))
        if a != b:
            lines.append(f"{key}: {a!r} vs {b!r}")
    return lines


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (JSON has lists only)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def set_fingerprint(s: FeatureSet) -> str | None:
    """The fingerprint of a set's features, from its provenance (None without one)."""
    return None if s.provenance is None else fingerprint(s.provenance)


def check_comparable(first: FeatureSet, second: FeatureSet, *, force: bool = False) -> list[str]:
    """Raise ``ProvenanceMismatch`` when the two sets' fingerprints differ, unless ``force`` (then warn).

    The fingerprint is the one test; the differing fields are listed only to say why. Returns them
    (empty when the sets are comparable).
    """
    if first.features.shape[1:] != second.features.shape[1:]:
        raise ProvenanceMismatch(
            f"{first.source} has {first.features.shape[1]}-d features and {second.source} "
            f"{second.features.shape[1]}-d ones: they come from different models and cannot be compared"
        )
    prints = set_fingerprint(first), set_fingerprint(second)
    if None in prints or prints[0] != prints[1]:
        what = "; ".join(provenance_differences(first.provenance, second.provenance))
        shown = " vs ".join(p or "none" for p in prints)
        if not force:
            raise ProvenanceMismatch(
                f"{first.source} and {second.source} were not made the same way (fingerprints {shown}: {what}); "
                "a distance between them would measure that difference. Recompute one set, or pass --force "
                "to compare anyway."
            )
        warnings.warn(f"comparing feature sets made differently (fingerprints {shown}: {what}): forced",
                      RuntimeWarning, stacklevel=2)
        return [f"fingerprint: {shown}", *provenance_differences(first.provenance, second.provenance)]
    versions = {p.get("version") for p in (first.provenance, second.provenance) if p}
    if len(versions) > 1:
        warnings.warn(f"the feature sets were made by different med3d-hub versions ({', '.join(sorted(versions))}); "
                      "their fingerprints match", RuntimeWarning, stacklevel=2)
    return []


# -- inputs -------------------------------------------------------------------------------------------


def split_sets(inputs: Sequence[str]) -> list[list[str]]:
    """Command-line inputs -> two sets.

    Two inputs: each is a set (a features file, a folder of scans, or one scan). More: files from two
    folders, as a shell writes ``real/*.nii.gz synthetic/*.nii.gz``, grouped by folder in order.
    """
    if len(inputs) < 2:
        raise UsageError("give two sets: two folders of scans, two features files (.npz), or real/*.nii.gz fake/*.nii.gz")
    if len(inputs) == 2:
        return [[inputs[0]], [inputs[1]]]
    groups: list[list[str]] = []
    for item in inputs:
        parent = os.path.dirname(os.path.normpath(item))
        if groups and os.path.dirname(os.path.normpath(groups[-1][0])) == parent:
            groups[-1].append(item)
        else:
            groups.append([item])
    if len(groups) != 2:
        folders = [os.path.dirname(os.path.normpath(g[0])) or "." for g in groups]
        raise UsageError(
            f"{len(inputs)} inputs fall into {len(groups)} runs of folders ({', '.join(folders[:5])}), not 2; "
            "put each set in its own folder and give the two folders"
        )
    return groups


def is_feature_file(items: Sequence[str]) -> bool:
    """One .npz, or one 2-D .npy: saved features rather than scans."""
    if len(items) != 1:
        return False
    name = items[0].lower()
    return name.endswith(".npz") or (name.endswith(".npy") and _looks_like_features(items[0]))


def _looks_like_features(path: str) -> bool:
    """A 2-D .npy is a features array; a 3-D one is a volume."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 2
    except (OSError, ValueError):
        return False


def expand_scans(items: Sequence[str]) -> list[str]:
    """Folders become the scans inside them (NIfTI, .npy, and sub-folders holding DICOM series), sorted."""
    scans: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and not _is_dicom_series(path):
            inside = sorted(p for p in path.iterdir()
                            if (p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES)) or (p.is_dir() and _is_dicom_series(p)))
            if not inside:
                raise UsageError(f"{item}: no scans inside (looked for {', '.join(SCAN_SUFFIXES)} files and DICOM folders)")
            scans += [str(p) for p in inside]
        else:
            scans.append(item)
    return scans


def _is_dicom_series(folder: Path) -> bool:
    """Files named *.dcm or without a suffix, and no NIfTI or .npy scans beside them."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.name.lower().endswith(SCAN_SUFFIXES) for p in files):
        return False
    return any(p.suffix.lower() == ".dcm" or p.suffix == "" for p in files)


def read_feature_file(path: str) -> FeatureSet:
    """A features file written by ``med3d features`` (pooled, 2-D)."""
    saved = load_features(path)
    if saved.features.ndim != 2:
        raise UsageError(f"{path}: features of shape {saved.features.shape}; scoring needs pooled (N, C) features")
    return FeatureSet(str(path), saved.features, saved.names, saved.provenance)


def features_of_scans(model: nn.Module, scans: Sequence[str], preprocess: Preprocess, *, source: str,
                      seed: int | None = None, amp: str | None = None, convention: str | None = None,
                      **options: Any) -> FeatureSet:
    """Pooled features of every scan, with their provenance; any failed scan is an error.

    A score over the scans that happened to be readable would not be a score of the set.
    """
    results = list(iter_features(model, scans, preprocess=preprocess, maps="pooled", amp=amp, **options))
    failed = [(r.name, r.error) for r in results if not r.ok]
    if failed:
        raise FeatureExtractionError(failed, len(results))
    features = np.stack([r.features for r in results])
    provenance = feature_provenance(model, preprocess, volumes=len(results), feature_dim=features.shape[1],
                                    input_shapes=[r.shape for r in results], amp=amp, seed=seed,
                                    convention=convention)
    return FeatureSet(source, features, [r.name for r in results], provenance)


# -- the scores -----------------------------------------------------------------------------------


def score_sets(first: FeatureSet, second: FeatureSet, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
               bandwidth: float | None = None, bootstrap: int = 0, seed: int = 0, force: bool = False) -> dict[str, Any]:
    """FID, KID and MMD between two comparable feature sets, as a JSON-ready report with provenance.

    A singular covariance is not warned about but listed in the report's ``warnings``.
    """
    differences = check_comparable(first, second, force=force)
    a, b = first.features.astype(np.float64), second.features.astype(np.float64)
    shared = _shared(first.provenance, second.provenance)
    estimator = (shared or {}).get("estimator", DEFAULTS["estimator"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", metrics.SingularCovarianceWarning)
        fid = metrics.fid(a, b, estimator=estimator)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, metrics.SingularCovarianceWarning)})
    kid = metrics.kid(a, b, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    sigma = metrics.median_bandwidth(a, b, seed=seed) if bandwidth is None else float(bandwidth)
    report: dict[str, Any] = {
        "fingerprint": score_fingerprint(first, second),
        "fid": fid,
        "fid_estimator": estimator,
        "fid_ci": None,
        "kid": {"mean": kid.mean, "std": kid.std, "subsets": kid.subsets, "subset_size": kid.subset_size,
                "kernel": "polynomial (x.y / D + 1)^3"},
        "mmd2_rbf": {"value": metrics.mmd(a, b, "rbf", bandwidth=sigma), "bandwidth": sigma,
                     "bandwidth_rule": "median pairwise distance" if bandwidth is None else "given"},
        "mmd2_linear": metrics.mmd(a, b, "linear"),
        "seed": seed,
        "sets": [_set_summary(s) for s in (first, second)],
        "provenance": shared,
        "provenance_differences": differences,
        "warnings": notes,
        "med3d_hub_version": __version__,
    }
    if bootstrap:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.SingularCovarianceWarning)  # said once above
            low, high = metrics.bootstrap(lambda x, y: metrics.fid(x, y, estimator=estimator), a, b,
                                          resamples=bootstrap, seed=seed)
        report["fid_ci"] = {"low": low, "high": high, "level": 0.95, "resamples": bootstrap, "method": "percentile"}
    return report


def score_fingerprint(first: FeatureSet, second: FeatureSet) -> str:
    """The score's fingerprint: the features' (the first set's where forced past a difference) and N per set."""
    return fingerprint(first.provenance or second.provenance, volumes=(len(first.features), len(second.features)))


def _set_summary(s: FeatureSet) -> dict[str, Any]:
    digest = hashlib.sha256(np.ascontiguousarray(s.features, dtype=np.float32).tobytes()).hexdigest()
    summary = {"source": s.source, "volumes": int(len(s.features)), "features_sha256": digest,
               "fingerprint": set_fingerprint(s)}
    if s.provenance:
        summary["input_shapes"] = s.provenance.get("input_shapes")
    return summary


def _shared(first: dict | None, second: dict | None) -> dict | None:
    """The provenance both sets share (the first set's where forced past a difference)."""
    base = first or second
    if base is None:
        return None
    return {k: v for k, v in base.items() if k not in ("volumes", "input_shapes", "fingerprint")}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The scores of a report, for people."""
    ci, kid, rbf = report["fid_ci"], report["kid"], report["mmd2_rbf"]
    interval = f"  (95% CI {ci['low']:.6g} .. {ci['high']:.6g}, {ci['resamples']} resamples)" if ci else ""
    return [
        f"FID   {report['fid']:.6g}{interval}",
        f"KID   {kid['mean']:.6g} +- {kid['std']:.3g}  ({kid['subsets']} subset(s) of {kid['subset_size']})",
        f"MMD^2 rbf {rbf['value']:.6g} (bandwidth {rbf['bandwidth']:.6g}), linear {report['mmd2_linear']:.6g}",
        "sets  " + " vs ".join(f"{s['source']} ({s['volumes']} volumes)" for s in report["sets"]),
        f"fingerprint {report['fingerprint']} ({(report['provenance'] or {}).get('convention', 'no provenance')}, "
        f"FID estimator {report['fid_estimator']})",
    ]
