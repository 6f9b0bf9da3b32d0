"""A finished ``med3d finetune`` run folder, read back as a whole network without the training code.

A run folder holds ``finetuned.safetensors`` (every weight of ``FinetuneNet``: encoder and head,
with ``task``, ``num_classes`` and ``class_names`` in the safetensors metadata),
``training_config.yaml`` (the recipe: ``model``, ``decoder``, ``drop_rate``, ``crop``) and
``config.json`` (the zoo model's config, whose ``preprocess`` is what the weights expect).
``training.finetune.load_finetuned`` and ``med3d predict`` both read runs through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import Med3DError, MissingFileError
from ..networks.finetune_net import FinetuneNet
from . import model_files
from .checkpoints import infer_shortcut

__all__ = ["FINETUNED_NAME", "TRAINING_CONFIG_NAME", "FinetunedRun", "is_finetune_run", "read_finetuned",
           "read_training_config"]

FINETUNED_NAME = "finetuned.safetensors"
TRAINING_CONFIG_NAME = "training_config.yaml"


class FinetunedRunError(Med3DError, ValueError):
    """A fine-tuning run folder that cannot be read; the message names the file."""


@dataclass
class FinetunedRun:
    """The network of a run (CPU, eval mode) and what applying it needs."""

    net: FinetuneNet
    task: str  # "seg" or "cls"
    class_names: list[str]
    crop: tuple[int, int, int]  # the training crop: the window of a sliding-window prediction
    preprocess: dict | None  # config.json's "preprocess"; None when the folder has no config.json
    training: dict


def is_finetune_run(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / FINETUNED_NAME).is_file() and (folder / TRAINING_CONFIG_NAME).is_file()


def read_training_config(folder: str | os.PathLike) -> dict | None:
    """``training_config.yaml`` of a run or an export as a dict; None when the folder has none."""
    path = Path(folder) / TRAINING_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        import yaml
    except ImportError:
        raise FinetunedRunError(f"reading {path} needs PyYAML: pip install pyyaml (or med3d-hub[train])") from None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise FinetunedRunError(f"{path}: cannot read it ({err})") from None
    if not isinstance(raw, dict):
        raise FinetunedRunError(f"{path}: expected a mapping of settings")
    return raw


def read_finetuned(folder: str | os.PathLike) -> FinetunedRun:
    """Rebuild the network of a finished fine-tuning run and load every weight strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .factory import create_model

    folder = Path(folder)
    path = folder / FINETUNED_NAME
    if not path.is_file():
        raise MissingFileError(f"{folder} has no {FINETUNED_NAME}: the run has not finished (or it is not a fine-tuning run)")
    cfg = read_training_config(folder) or {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        task, num_classes = meta["task"], int(meta["num_classes"])
    except (KeyError, ValueError):
        raise FinetunedRunError(f"{path}: its metadata lacks task / num_classes; rerun the fine-tuning") from None
    state = load_file(str(path))
    model_files.check_finite(state, source=str(path))
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    backbone = create_model(str(cfg.get("model", "resnet10")), num_classes=0, shortcut=infer_shortcut(encoder))
    net = FinetuneNet(backbone, task, num_classes, str(cfg.get("decoder", "paper")), float(cfg.get("drop_rate", 0.0)))
    net.load_state_dict(state, strict=True)
    names = [n for n in meta.get("class_names", "").split(",") if n]
    if len(names) != num_classes:
        names = [str(c) for c in range(num_classes)]
    preprocess = None
    if (folder / model_files.CONFIG_NAME).is_file():
        preprocess = model_files.read_config(folder / model_files.CONFIG_NAME).get("preprocess")
    crop = tuple(int(n) for n in cfg.get("crop", (64, 96, 96)))
    return FinetunedRun(net.eval(), task, names, crop, preprocess, cfg)

