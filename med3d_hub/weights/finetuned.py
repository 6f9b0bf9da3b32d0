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
from functools import partial
from pathlib import Path

from ..errors import Med3DError, MissingFileError
from ..networks.finetune_net import FinetuneNet
from ..networks.registry import split_name
from . import model_files
from .checkpoints import CheckpointMismatchError, check_finite
from .hub_model import build_model
from .loader import ResolvedWeights, load_model
from .pretrained_cfg import PretrainedCfg

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
    """Rebuild the network of a finished fine-tuning run and load every weight strictly.

    The encoder goes through the one loader (``loader.load_model``) like any other weights; the run's
    head, which only ``FinetuneNet`` has, is then loaded strictly into the net around it.
    """
    from safetensors import safe_open

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
    preprocess = None
    if (folder / model_files.CONFIG_NAME).is_file():
        preprocess = model_files.read_config(folder / model_files.CONFIG_NAME).get("preprocess")
    arch, _ = split_name(str(cfg.get("model", "resnet10")))
    encoder_weights, head = _resolve_run(path, arch, preprocess)
    encoder = load_model(partial(build_model, arch), encoder_weights, num_classes=0)
    net = FinetuneNet(encoder, task, num_classes, str(cfg.get("decoder", "paper")), float(cfg.get("drop_rate", 0.0)))
    net.head.load_state_dict(head, strict=True)
    names = [n for n in meta.get("class_names", "").split(",") if n]
    if len(names) != num_classes:
        names = [str(c) for c in range(num_classes)]
    crop = tuple(int(n) for n in cfg.get("crop", (64, 96, 96)))
    return FinetunedRun(net.eval(), task, names, crop, preprocess, cfg)


def _resolve_run(path: Path, arch: str, preprocess: dict | None) -> tuple[ResolvedWeights, dict]:
    """The run's encoder weights (for the loader) and its head's state dict; anything else in the file is an error."""
    from safetensors.torch import load_file

    from ..data.preprocess import PAPER_PREPROCESS, Preprocess
    from ..files import sha256_file

    state = load_file(str(path))
    check_finite(state, source=str(path))
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    other = sorted(k for k in state if not k.startswith(("encoder.", "head.")))
    if other:
        raise CheckpointMismatchError(f"{path} holds keys that are neither encoder.* nor head.*: {', '.join(other[:8])}")
    cfg = PretrainedCfg(
        name=arch, architecture=arch, filename=path.name, sha256=sha256_file(path), size=path.stat().st_size,
        format="safetensors", file=str(path),
        preprocess=Preprocess.from_dict(PAPER_PREPROCESS if preprocess is None else preprocess).to_dict(),
    )  # fmt: skip
    return ResolvedWeights(encoder, cfg, f"{path} (encoder)"), head
