"""The fine-tuning configuration: ``TrainConfig`` (the co-training's settings) plus the transfer recipe.

Every key of ``med3d_hub.training.config.TrainConfig`` keeps its meaning (steps, batch_size, crop,
val_every, checkpoint_every, amp, device, ...). The keys added here describe the transfer:

- ``task``: ``seg`` (one MSD task folder in ``tasks``) or ``cls`` (a CSV of labelled volumes).
- ``pretrained``: the encoder's starting weights: ``default`` (the depth's default Med3D weights),
  a tag (``3dseg8``, ``23datasets``), a local file (MedicalNet ``.pth``, ``.safetensors``, a
  co-training run's ``encoder.safetensors``), ``hf://org/repo@rev/file``, or ``none`` (from scratch).
- ``lr``: left out, it is the paper's: 1e-3 from pretrained weights, 1e-2 from scratch.
- ``new_layers_lr_mult``: the decoder / classifier learns this many times faster than a pretrained
  encoder (from scratch every layer is new, and all share ``lr``).
- ``freeze_epochs``: the encoder is held fixed (learning rate 0, BatchNorm statistics frozen) for
  this many epochs; an epoch is as many samples as there are training cases.
- ``decoder`` (seg): ``paper`` (3 x [transposed conv + conv] then a 1x1x1 conv, output at the
  input's size) or ``conv_seg`` (upstream MedicalNet's head, 1/4 of the input, upsampled).
- ``csv``, ``num_classes``, ``class_names``, ``class_weights``, ``intensity``, ``spacing`` (cls):
  the label file, its classes, the cross-entropy weights (``balanced`` or a list) and the
  preprocessing of each volume before it is resized to ``crop``.

Defaults follow the transfer recipe of the Med3D paper (Chen, Ma, Zheng 2019): Adam at a constant rate, no
warm-up; weight decay off.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ..weights.factory import is_random
from .config import ConfigError, TrainConfig, _check_choice, _check_int, _check_keys, _number, resolve_config_path

__all__ = ["FinetuneConfig", "load_finetune_config", "PAPER_LR_PRETRAINED", "PAPER_LR_SCRATCH"]

PAPER_LR_PRETRAINED = 1e-3
PAPER_LR_SCRATCH = 1e-2
@dataclass
class FinetuneConfig(TrainConfig):
    """Every setting of a fine-tuning run (see the module docstring for the keys added)."""

    task: str = "seg"
    pretrained: str = "default"
    decoder: str = "paper"
    new_layers_lr_mult: float = 10.0
    freeze_epochs: int = 0
    csv: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    class_weights: Any = None
    intensity: dict | None = None
    spacing: tuple[float, float, float] | None = None
    drop_rate: float = 0.0
    notes: str = ""
    # defaults that differ from the co-training's
    output: str = "runs/finetune"
    lr: float | None = None  # type: ignore[assignment]
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    steps: int = 2000
    val_every: int = 100
    checkpoint_every: int = 100
    crop: tuple[int, int, int] = (64, 96, 96)

    def __post_init__(self) -> None:
        _check_choice(self.task, "task", ("seg", "cls"))
        if not isinstance(self.pretrained, str) or not self.pretrained.strip():
            raise ConfigError(f"pretrained must be a tag, a file, 'default' or 'none', got {self.pretrained!r}")
        if self.lr is None:
            self.lr = PAPER_LR_SCRATCH if is_random(self.pretrained) else PAPER_LR_PRETRAINED
        super().__post_init__()
        _check_choice(self.decoder, "decoder", ("paper", "conv_seg"))
        if _number(self.new_layers_lr_mult, "new_layers_lr_mult") <= 0:
            raise ConfigError(f"new_layers_lr_mult must be > 0, got {self.new_layers_lr_mult!r}")
        _check_int(self.freeze_epochs, "freeze_epochs", minimum=0)
        if self.num_classes is not None:
            _check_int(self.num_classes, "num_classes", minimum=2)
        if self.class_names is not None:
            if not isinstance(self.class_names, list) or not all(isinstance(n, str) and n for n in self.class_names):
                raise ConfigError(f"class_names must be a list of names, got {self.class_names!r}")
            if self.num_classes is not None and len(self.class_names) != self.num_classes:
                raise ConfigError(f"class_names lists {len(self.class_names)} names but num_classes is {self.num_classes}")
        cw = self.class_weights
        if cw is not None and cw != "balanced":
            if not isinstance(cw, list) or not cw or any(_number(w, "class_weights") <= 0 for w in cw):
                raise ConfigError(f"class_weights must be null, 'balanced' or a list of positive numbers, got {cw!r}")
            if self.num_classes is not None and len(cw) != self.num_classes:
                raise ConfigError(f"class_weights has {len(cw)} values but num_classes is {self.num_classes}")
        if self.intensity is not None and not isinstance(self.intensity, dict):
            raise ConfigError("intensity must be a mapping such as {method: hu_window, min: -1000, max: 400}")
        if self.spacing is not None:
            try:
                values = tuple(float(v) for v in self.spacing)
            except (TypeError, ValueError):
                values = ()
            if len(values) != 3 or any(v <= 0 for v in values):
                raise ConfigError(f"spacing must be three positive numbers (mm along D, H, W) or null, got {self.spacing!r}")
            self.spacing = values  # type: ignore[assignment]
        if not 0.0 <= _number(self.drop_rate, "drop_rate") < 1.0:
            raise ConfigError(f"drop_rate must lie in [0, 1), got {self.drop_rate!r}")

    def check_runnable(self) -> None:
        if self.task == "seg":
            if len(self.tasks) != 1:
                raise ConfigError(
                    f"segmentation fine-tuning takes one MSD task folder (--data FOLDER), got {len(self.tasks)}"
                )
        elif not self.csv:
            raise ConfigError("classification fine-tuning needs a label file: --csv FILE (columns path,label[,split])")

    @property
    def scratch(self) -> bool:
        return is_random(self.pretrained)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> FinetuneConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
        _check_keys(raw, cls, where)
        try:
            return cls(**raw)
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from err

    def replace(self, **changes: Any) -> FinetuneConfig:
        _check_keys(changes, type(self), "override")
        if "pretrained" in changes and "lr" not in changes and self._lr_is_default():
            changes["lr"] = None  # the paper's rate for the new starting point
        return dataclasses.replace(self, **changes)

    def _lr_is_default(self) -> bool:
        return self.lr == (PAPER_LR_SCRATCH if self.scratch else PAPER_LR_PRETRAINED)


def load_finetune_config(path: str | os.PathLike) -> FinetuneConfig:
    """Read a fine-tuning recipe (a local YAML file or a packaged one such as ``configs/finetune-lits-liver.yaml``)."""
    import yaml

    resolved = resolve_config_path(path)
    try:
        raw = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{resolved}: not valid YAML ({err})") from err
    return FinetuneConfig.from_dict(raw or {}, where=str(resolved))
