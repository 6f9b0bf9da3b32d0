"""A finished run, read: the model, its config, preprocessing, training recipe, data and validation.

    run = read_run("runs/3dseg8-r50")       # a co-training run, or a model folder

What a run is (the whole interface read from a run folder):

- **A co-training run** of ``med3d_hub.train``: ``config.yaml`` (the run's settings; ``model``,
  ``tasks`` with ``name``, ``path`` and ``intensity``, and the recipe), ``encoder.safetensors``
  (the encoder, written when the run ends; a checkpoint ``checkpoints/step_*.pt`` instead when
  ``checkpoint=`` is given), ``metrics.jsonl`` (validation records ``{"kind": "val", "step",
  "dice/<task>", "dice/<task>/<class>", "dice_mean"}``) and ``curves.png``. Each task's
  ``dataset.json``, when its folder is still where the run found it, gives the modality, the
  labels, the number of cases and the licence of the data.
- **A model folder**, as ``model.save_pretrained(folder)`` or ``med3d export`` writes it:
  ``config.json`` and ``model.safetensors``, with any head and any ``in_chans`` (a fine-tuned
  model). A ``metrics.jsonl``, ``training_config.yaml`` or ``curves.png`` in the folder is used
  when present.

The weights are checked before anything is written: no NaN or infinite values, and a strict load
into the network the config describes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import Med3DError, UsageError
from ..networks.resnet import ARCHITECTURES
from ..weights import model_files
from ..weights.hub_model import build_model
from ..weights.loader import ResolvedWeights, load_model
from ..weights.pretrained_cfg import PretrainedCfg

__all__ = ["DatasetInfo", "RUN_CONFIG", "RUN_ENCODER", "Run", "RunError", "Validation", "license_id", "read_run"]

RUN_CONFIG = "config.yaml"
RUN_ENCODER = "encoder.safetensors"
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


class RunError(Med3DError, ValueError):
    """A run folder that cannot be exported as it is; the message says what is missing and what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset the weights were trained on."""

    name: str
    folder: str | None = None  # the MSD task folder, e.g. Task09_Spleen
    modality: str | None = None
    labels: tuple[str, ...] = ()
    cases: int | None = None
    licence: str | None = None
    reference: str | None = None

    def describe(self) -> str:
        """``"Spleen (Task09_Spleen, CT)"``."""
        extra = ", ".join(x for x in (self.folder, self.modality) if x and x != self.name)
        return f"{self.name} ({extra})" if extra else self.name


@dataclass(frozen=True)
class Validation:
    """The validation record of the published weights: mean foreground Dice per dataset."""

    step: int
    dice: dict[str, float]
    per_class: dict[str, dict[str, float]]
    mean: float | None


@dataclass
class Run:
    """A finished run, read and checked: the model with its weights and what is known about its training."""

    path: Path
    kind: str  # "co-training run" or "model folder"
    model: nn.Module  # the network of the config with the weights loaded strictly, on the CPU, in eval mode
    config: dict  # config.json of the model (model_files.model_config), preprocessing included
    weights_source: str
    preprocess: dict
    step: int | None = None
    datasets: list[DatasetInfo] = field(default_factory=list)
    validation: Validation | None = None
    training: dict | None = None
    world_size: int | None = None
    license: str | None = None  # the data's licence, when every dataset states the same one
    extra_files: dict[str, Path] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return model_files.zoo_architecture(self.config)

    @property
    def head(self) -> str | None:
        """``"num_classes=3"``, ``"seg_classes=4"`` or None (an encoder)."""
        if self.config.get("seg_classes"):
            return f"seg_classes={self.config['seg_classes']}"
        if self.config.get("num_classes"):
            return f"num_classes={self.config['num_classes']}"
        return None


def license_id(text: str) -> str:
    """A licence as the Hub's card metadata spells it: ``"CC-BY-SA 4.0"`` -> ``"cc-by-sa-4.0"``."""
    value = re.sub(r"[\s_]+", "-", str(text).strip().lower())
    if not _LICENSE.fullmatch(value):
        raise UsageError(f"licence {text!r} is not a licence id such as mit, apache-2.0, cc-by-4.0, cc-by-sa-4.0")
    return value


def read_run(
    path: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    preprocess: Mapping | None = None,
    datasets: Sequence[str] | None = None,
) -> Run:
    """Read a co-training run or a model folder (see the module docstring) and check its weights.

    ``checkpoint``: ``"latest"`` or a ``checkpoints/step_*.pt`` file of a co-training run, for a run
    that has no ``encoder.safetensors`` yet. ``preprocess`` replaces the preprocessing derived from
    the run. ``datasets`` names the training datasets of a model folder.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise RunError(f"{path} is not a folder: give a co-training run folder or a model folder (config.json + model.safetensors)")
    if (path / RUN_CONFIG).is_file() and ((path / RUN_ENCODER).is_file() or (path / "checkpoints").is_dir()):
        run = _read_cotraining(path, checkpoint)
    elif (path / model_files.CONFIG_NAME).is_file() and (path / model_files.WEIGHTS_NAME).is_file():
        if checkpoint is not None:
            raise RunError(f"{path} is a model folder; a checkpoint can only be picked in a co-training run")
        run = _read_model_folder(path)
    else:
        raise RunError(
            f"{path} is neither a co-training run ({RUN_CONFIG} + {RUN_ENCODER} or checkpoints/) nor a model folder "
            f"({model_files.CONFIG_NAME} + {model_files.WEIGHTS_NAME}, as model.save_pretrained(folder) writes it)"
        )
    if preprocess is not None:
        from ..data.preprocess import Preprocess

        try:
            run.preprocess = Preprocess.from_dict(preprocess).to_dict()
        except (TypeError, ValueError) as error:
            raise RunError(f"preprocess: {error}") from None
    if run.preprocess is None:
        raise RunError(
            "the datasets of this run were normalised differently (their `intensity` settings differ), so no one "
            "preprocessing describes the weights: give it, e.g. --preprocess '{\"intensity\": {\"method\": \"percentile_zscore\"}}'"
        )
    run.config["preprocess"] = run.preprocess
    if datasets:
        run.datasets = [DatasetInfo(name=str(d)) for d in datasets]
    return run


def _load_checked(arch: str, state: dict[str, torch.Tensor], source: str, **kwargs: Any) -> nn.Module:
    """The model of these weights through the one loader: non-finite weights refused, head and backbone strict; eval mode."""
    weights = ResolvedWeights(state, PretrainedCfg(name=arch, architecture=arch, file=source, format="safetensors"), source)
    return load_model(partial(build_model, arch), weights, head="exact", **kwargs).eval()


def _read_cotraining(path: Path, checkpoint: str | os.PathLike | None) -> Run:
    import yaml

    try:
        cfg = yaml.safe_load((path / RUN_CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise RunError(f"cannot read {path / RUN_CONFIG}: {error}") from None
    arch = cfg.get("model") if isinstance(cfg, dict) else None
    if arch not in ARCHITECTURES:
        raise RunError(f"{path / RUN_CONFIG}: model {arch!r} is not one of {', '.join(ARCHITECTURES)}")

    world_size = None
    if checkpoint is None:
        weights = path / RUN_ENCODER
        if not weights.is_file():
            raise RunError(
                f"{path} has no {RUN_ENCODER}: the run has not finished. Export a checkpoint instead "
                "(--checkpoint latest, or --checkpoint checkpoints/step_XXXXXXXX.pt)"
            )
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(weights))
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        step = _int(meta.get("steps")) or _int(cfg.get("steps"))
        source = str(weights)
        world_size = _peek_world_size(path, step)
    else:
        state, step, world_size, source = _from_checkpoint(path, checkpoint, arch)

    model = _load_checked(arch, state, source, num_classes=0)
    tasks = [t for t in cfg.get("tasks") or [] if isinstance(t, dict)]
    datasets = [_dataset_info(t, cfg) for t in tasks]
    records = _metrics(path / "metrics.jsonl")
    extra = {name: path / name for name in ("metrics.jsonl", "curves.png") if (path / name).is_file()}
    preprocess = _run_preprocess(tasks)
    return Run(
        path=path,
        kind="co-training run",
        model=model,
        config=model_files.model_config(model, preprocess),
        weights_source=source,
        preprocess=preprocess,
        step=step,
        datasets=datasets,
        validation=_validation(records, step),
        training=_redacted(cfg),
        world_size=world_size,
        license=_common_licence(datasets),
        extra_files=extra,
    )


def _from_checkpoint(path: Path, checkpoint: str | os.PathLike, arch: str):
    from ..training.checkpoint import CheckpointError, find_checkpoints, load_checkpoint
    from ..training.encoder import encoder_state_dict

    if str(checkpoint) == "latest":
        found = find_checkpoints(path / "checkpoints")
        if not found:
            raise RunError(f"{path / 'checkpoints'} holds no checkpoint (step_*.pt)")
        file = found[-1][1]
    else:
        file = Path(checkpoint).expanduser()
        if not file.is_absolute() and not file.is_file():
            file = path / file
        if not file.is_file():
            raise RunError(f"checkpoint {checkpoint}: no such file")
    try:
        state = load_checkpoint(file)  # torch.load(weights_only=True)
    except CheckpointError as error:
        raise RunError(str(error)) from None
    if state.get("config", {}).get("model", arch) != arch:
        raise RunError(f"{file} was made for {state['config']['model']}, the run's config says {arch}")
    try:
        encoder = encoder_state_dict(state["model"], arch)
    except ValueError as error:
        raise RunError(f"{file}: {error}") from None
    return encoder, _int(state.get("step")), _int(state.get("world_size")), str(file)


def _peek_world_size(path: Path, step: int | None) -> int | None:
    """Processes of the run, from its last checkpoint (memory-mapped: no tensor is read). None if unknown."""
    if step is None:
        return None
    file = path / "checkpoints" / f"step_{step:08d}.pt"
    if not file.is_file():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # informative only: a checkpoint we cannot read leaves the number unknown
        return None
    return _int(state.get("world_size")) if isinstance(state, dict) else None


def _read_model_folder(path: Path) -> Run:
    from ..data.preprocess import PAPER_PREPROCESS

    try:
        config = model_files.read_config(path / model_files.CONFIG_NAME)
    except (OSError, ValueError) as error:
        raise RunError(str(error)) from None
    arch, weights = model_files.resolve_saved(path, config=config)
    model = load_model(partial(build_model, arch), weights, head="exact").eval()
    preprocess = config.get("preprocess") or dict(PAPER_PREPROCESS)
    training = None
    if (path / "training_config.yaml").is_file():
        import yaml

        try:
            training = yaml.safe_load((path / "training_config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            training = None
    tasks = [t for t in (training or {}).get("tasks") or [] if isinstance(t, dict)] if isinstance(training, dict) else []
    records = _metrics(path / "metrics.jsonl")
    validation = _validation(records, None)
    return Run(
        path=path,
        kind="model folder",
        model=model,
        config=model_files.model_config(model, preprocess, config.get("class_names")),
        weights_source=str(weights),
        preprocess=preprocess,
        step=validation.step if validation else None,
        datasets=[_dataset_info(t, training) for t in tasks],
        validation=validation,
        training=_redacted(training) if isinstance(training, dict) else None,
        extra_files={name: path / name for name in ("metrics.jsonl", "curves.png") if (path / name).is_file()},
    )


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _run_preprocess(tasks: list[dict]) -> dict | None:
    """What the run fed the encoder: each dataset at its own median spacing, the run's intensity normalisation.

    None when the datasets were normalised differently (the caller must then be told).
    """
    from ..data.preprocess import PAPER_PREPROCESS, Preprocess

    intensities = []
    for task in tasks:
        try:
            intensities.append(Preprocess(intensity=task.get("intensity") or PAPER_PREPROCESS["intensity"]).intensity)
        except (TypeError, ValueError):
            return None
    if any(i != intensities[0] for i in intensities[1:]):
        return None
    intensity = intensities[0] if intensities else PAPER_PREPROCESS["intensity"]
    return Preprocess(spacing=None, intensity=intensity, crop_foreground=False, size=None).to_dict()


def _dataset_info(task: Mapping, cfg: Mapping | None) -> DatasetInfo:
    name = str(task.get("name") or "dataset")
    raw_path = task.get("path")
    folder = Path(str(raw_path)).name if raw_path else None
    meta = _dataset_json(raw_path, (cfg or {}).get("data_root")) if raw_path else None
    if not meta:
        return DatasetInfo(name=name, folder=folder)
    modality = meta.get("modality")
    if isinstance(modality, Mapping):
        values = [str(v) for v in modality.values()]
        channel = task.get("channel")
        modality = values[channel] if isinstance(channel, int) and 0 <= channel < len(values) else ", ".join(values)
    labels = meta.get("labels")
    if isinstance(labels, Mapping):
        labels = tuple(str(v) for _, v in sorted(labels.items(), key=lambda kv: _int(kv[0]) or 0))
    else:
        labels = ()
    licence = meta.get("licence") or meta.get("license")
    return DatasetInfo(
        name=name,
        folder=folder,
        modality=str(modality) if modality else None,
        labels=labels,
        cases=_int(meta.get("numTraining")),
        licence=str(licence) if licence else None,
        reference=str(meta["reference"]) if meta.get("reference") else None,
    )


def _dataset_json(raw_path: Any, data_root: Any) -> dict | None:
    """The task's dataset.json, when the folder is still there (best effort: the export may run elsewhere)."""
    folder = Path(os.path.expandvars(os.path.expanduser(str(raw_path))))
    if not folder.is_absolute() and data_root:
        folder = Path(os.path.expandvars(os.path.expanduser(str(data_root)))) / folder
    try:
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _common_licence(datasets: list[DatasetInfo]) -> str | None:
    licences = {d.licence for d in datasets}
    if len(licences) != 1 or None in licences:
        return None
    try:
        return license_id(licences.pop())
    except ValueError:
        return None


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    from ..training.metrics import read_metrics

    return read_metrics(path)


def _validation(records: list[dict], step: int | None) -> Validation | None:
    """The last validation record at or before the weights' step."""
    val = [r for r in records if r.get("kind") == "val" and (step is None or r["step"] <= step)]
    if not val:
        return None
    last = max(val, key=lambda r: r["step"])
    dice, per_class = {}, {}
    for key, value in last.items():
        if not key.startswith("dice/") or not isinstance(value, (int, float)):
            continue
        parts = key.split("/")
        if len(parts) == 2:
            dice[parts[1]] = float(value)
        elif len(parts) == 3:
            per_class.setdefault(parts[1], {})[parts[2]] = float(value)
    mean = last.get("dice_mean")
    return Validation(int(last["step"]), dice, per_class, float(mean) if isinstance(mean, (int, float)) else None)


def _redacted(cfg: Mapping) -> dict:
    """The run config without local paths: task folders by name, no cache or output location."""
    out = json.loads(json.dumps(cfg, default=str))
    for task in out.get("tasks") or []:
        if isinstance(task, dict) and task.get("path"):
            task["path"] = Path(str(task["path"])).name
    if "data_root" in out:
        out["data_root"] = "."
    if "cache_dir" in out:
        out["cache_dir"] = None
    for key in ("output", "csv"):  # the run folder; a classification's label file
        if out.get(key):
            out[key] = Path(str(out[key])).name
    return out
