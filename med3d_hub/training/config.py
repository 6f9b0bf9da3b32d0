"""Training configurations: one base, a section per kind of task, one dataclass per command.

A config file is flat YAML: the keys of one of these dataclasses. They are built from parts:

- ``RunConfig``: what every training run has (model, optimiser and schedule, steps, batches, crop,
  precision, device, validation cadence, seed, output, ...);
- ``SegmentationSection``: MSD task folders (``tasks``, ``data_root``), foreground sampling,
  sliding-window validation;
- ``ClassificationSection``: a CSV of labelled volumes, its classes and preprocessing;
- ``TransferSection``: the starting weights and their learning rates (fine-tuning).

``TrainConfig`` (``med3d train``, the co-training) is the base plus the segmentation section;
``finetune_config.SegFinetuneConfig`` and ``ClsFinetuneConfig`` (``med3d finetune seg|cls``) add
the transfer section to the segmentation or the classification one. A key that the run's dataclass
does not have is an error naming the key, the runs it belongs to and what to do, so nothing in a
recipe is silently ignored. ``--config configs/3dseg8.yaml`` also finds the file shipped inside the
package when no such local path exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import Med3DError

__all__ = [
    "ClassificationSection", "ConfigError", "RunConfig", "SegmentationSection", "TaskConfig", "TrainConfig",
    "TransferSection", "load_config", "packaged_configs", "read_config_file", "resolve_config_path",
    "PAPER_LR_PRETRAINED", "PAPER_LR_SCRATCH",
]

# The Med3D paper's fine-tuning rates (Chen, Ma, Zheng 2019): from pretrained weights, from scratch.
PAPER_LR_PRETRAINED = 1e-3
PAPER_LR_SCRATCH = 1e-2


class ConfigError(Med3DError, ValueError):
    """A configuration value or file is invalid; the message names the key."""


# -- checks of single values ---------------------------------------------------------------------

def check_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def check_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_range(value: Any, key: str, low: float, high: float) -> None:
    if not low <= check_number(value, key) <= high:
        raise ConfigError(f"{key} must lie in [{low}, {high}], got {value!r}")


def check_choice(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def check_triple(value: Any, key: str) -> tuple[int, int, int]:
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ConfigError(f"{key} must be three positive integers D, H, W, got {value!r}")
    return items  # type: ignore[return-value]


def as_number(value: Any) -> Any:
    """A number written as text (``1e-4``, which YAML 1.1 reads as a string) as a float; else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- the base: what every training run has ------------------------------------------------------

@dataclass
class RunConfig:
    """Every setting a training run has, whatever its task. Sizes are D, H, W; steps count optimiser updates.

    ``crop`` is the training crop (segmentation) or the network's input size (classification).
    """

    # What the run is called in messages ("segmentation fine-tuning (`med3d finetune seg`)").
    run_name: typing.ClassVar[str] = "a training run"

    model: str = "resnet10"
    cache_dir: str | None = None
    output: str = "runs/cotrain"
    notes: str = ""
    # sampling and batches
    steps: int = 1000
    batch_size: int = 2
    accum_steps: int = 1
    crop: tuple[int, int, int] = (64, 128, 128)
    augment: bool = True
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    poly_power: float = 0.9
    grad_clip: float | None = 12.0
    # speed and memory
    amp: str = "auto"
    channels_last: bool = False
    grad_checkpointing: bool = False
    deterministic: bool = False
    workers: int = 2
    device: str = "auto"
    dist_backend: str = "auto"
    # validation
    val_fraction: float = 0.1
    val_every: int = 500
    val_max_cases: int | None = None
    sw_batch_size: int = 2
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    skip_bad_cases: bool = False
    dist_timeout_min: float = 60.0

    def __post_init__(self) -> None:
        for key in _float_keys(type(self)):
            setattr(self, key, as_number(getattr(self, key)))
        from ..networks.registry import list_models

        if self.model not in list_models():
            raise ConfigError(f"model must be one of {', '.join(list_models())}, got {self.model!r}")
        for key in ("steps", "batch_size", "accum_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                    "val_every", "sw_batch_size"):
            check_int(getattr(self, key), key, minimum=1)
        for key in ("warmup_steps", "workers", "seed"):
            check_int(getattr(self, key), key, minimum=0)
        if self.val_max_cases is not None:
            check_int(self.val_max_cases, "val_max_cases", minimum=1)
        self.crop = check_triple(self.crop, "crop")
        check_range(self.val_fraction, "val_fraction", 0.0, 0.9)
        for key in ("lr", "dist_timeout_min"):
            if check_number(getattr(self, key), key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("momentum", "weight_decay", "warmup_lr", "min_lr", "poly_power"):
            if check_number(getattr(self, key), key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.grad_clip is not None and check_number(self.grad_clip, "grad_clip") <= 0:
            raise ConfigError(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip!r}")
        check_choice(self.optimizer, "optimizer", ("sgd", "adam", "adamw"))
        check_choice(self.schedule, "schedule", ("cosine", "poly", "constant"))
        check_choice(self.amp, "amp", ("auto", "none", "bf16", "fp16"))
        check_choice(self.dist_backend, "dist_backend", ("auto", "nccl", "gloo"))
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for key in ("augment", "channels_last", "grad_checkpointing", "deterministic", "skip_bad_cases"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.notes, str):
            raise ConfigError(f"notes must be text, got {self.notes!r}")

    def check_runnable(self) -> None:
        """Errors that only matter when training starts (a config file may leave the data to flags)."""

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples), ready for YAML, JSON and checkpoints."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config"):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
        try:
            return cls(**_accepted(cls, raw, where))
        except TypeError as err:  # a wrong type that dataclasses noticed before our checks
            raise ConfigError(f"{where}: {err}") from err

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **_accepted(type(self), changes, "override"))


@functools.cache
def _float_keys(cls: type) -> tuple[str, ...]:
    """The keys typed ``float`` (or ``float | None``): they take a number written as text."""
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls)
                 if hints[f.name] is float or float in typing.get_args(hints[f.name]))


# -- the sections: what a kind of task adds -----------------------------------------------------

@dataclass
class TaskConfig:
    """One MSD segmentation task folder and how to read it.

    ``num_classes`` counts the background; when left out it is read from the ``labels`` of the
    task's ``dataset.json``. ``channel`` picks one modality of a multi-channel image (Med3D is
    single-channel). ``weight`` is how many micro-batches this task gets per sampling cycle.
    ``crop`` and ``intensity`` override the run-wide values for this task only.
    """

    name: str
    path: str
    num_classes: int | None = None
    channel: int | None = None
    weight: int = 1
    crop: tuple[int, int, int] | None = None
    intensity: dict | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        where = f"tasks[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(
                f"task name {self.name!r} must be a plain identifier (letters, digits, '_'), "
                "for example 'Spleen'; it names the decoder branch and the metrics."
            )
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ConfigError(f"{where}.path must be the task's MSD folder, got {self.path!r}")
        self.path = str(self.path)
        if self.num_classes is not None:
            check_int(self.num_classes, f"{where}.num_classes", minimum=2)
        if self.channel is not None:
            check_int(self.channel, f"{where}.channel", minimum=0)
        check_int(self.weight, f"{where}.weight", minimum=1)
        if self.crop is not None:
            self.crop = check_triple(self.crop, f"{where}.crop")
        if self.intensity is not None and not isinstance(self.intensity, dict):
            raise ConfigError(f"{where}.intensity must be a mapping such as {{method: percentile_zscore}}")

    @classmethod
    def from_dict(cls, raw: Any, index: int) -> TaskConfig:
        where = f"tasks[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with at least `name` and `path`, got {raw!r}")
        _check_known(raw, [f.name for f in dataclasses.fields(cls)], where)
        missing = [k for k in ("name", "path") if k not in raw]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        return cls(**raw)


@dataclass
class SegmentationSection:
    """Segmentation data: MSD task folders, foreground oversampling, sliding-window validation."""

    tasks: list[TaskConfig] = field(default_factory=list)
    data_root: str = "."
    foreground_prob: float = 0.33
    val_overlap: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        self.tasks = [t if isinstance(t, TaskConfig) else TaskConfig.from_dict(t, i) for i, t in enumerate(self.tasks)]
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"task names must be unique; repeated: {', '.join(dupes)}")
        check_range(self.foreground_prob, "foreground_prob", 0.0, 1.0)
        check_range(self.val_overlap, "val_overlap", 0.0, 0.95)

    def crop_for(self, task: TaskConfig) -> tuple[int, int, int]:
        return task.crop or self.crop  # type: ignore[attr-defined]

    def task_path(self, task: TaskConfig) -> Path:
        """The task folder; relative paths are taken from ``data_root``."""
        path = Path(os.path.expandvars(os.path.expanduser(task.path)))
        if not path.is_absolute():
            path = Path(os.path.expandvars(os.path.expanduser(self.data_root))) / path
        return path


@dataclass
class ClassificationSection:
    """Classification data: a CSV of labelled volumes, its classes, their preprocessing, the classifier's dropout.

    ``intensity`` and ``spacing`` preprocess each volume before it is resized to ``crop``;
    ``class_weights`` weighs the cross-entropy (``balanced`` or one number per class).
    """

    csv: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    class_weights: Any = None
    intensity: dict | None = None
    spacing: tuple[float, float, float] | None = None
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        if self.num_classes is not None:
            check_int(self.num_classes, "num_classes", minimum=2)
        if self.class_names is not None:
            if not isinstance(self.class_names, list) or not all(isinstance(n, str) and n for n in self.class_names):
                raise ConfigError(f"class_names must be a list of names, got {self.class_names!r}")
            if self.num_classes is not None and len(self.class_names) != self.num_classes:
                raise ConfigError(f"class_names lists {len(self.class_names)} names but num_classes is {self.num_classes}")
        self._check_class_weights()
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
        if not 0.0 <= check_number(self.drop_rate, "drop_rate") < 1.0:
            raise ConfigError(f"drop_rate must lie in [0, 1), got {self.drop_rate!r}")

    def _check_class_weights(self) -> None:
        cw = self.class_weights
        if cw is None or cw == "balanced":
            return
        if isinstance(cw, list):
            cw = self.class_weights = [as_number(w) for w in cw]
        if not isinstance(cw, list) or not cw or any(check_number(w, "class_weights") <= 0 for w in cw):
            raise ConfigError(f"class_weights must be null, 'balanced' or a list of positive numbers, got {cw!r}")
        if self.num_classes is not None and len(cw) != self.num_classes:
            raise ConfigError(f"class_weights has {len(cw)} values but num_classes is {self.num_classes}")


@dataclass
class TransferSection:
    """Fine-tuning: the encoder's starting weights and how fast each part learns, with the paper's defaults.

    - ``task``: ``seg`` or ``cls`` (fixed by the run's dataclass; a recipe may state it).
    - ``pretrained``: ``default`` (the depth's default Med3D weights), a tag (``3dseg8``,
      ``23datasets``), a local file (MedicalNet ``.pth``, ``.safetensors``, a co-training run's
      ``encoder.safetensors``), ``hf://org/repo@rev/file``, or ``none`` (from scratch).
    - ``lr``: left out, the paper's: 1e-3 from pretrained weights, 1e-2 from scratch.
    - ``new_layers_lr_mult``: the decoder / classifier learns this many times faster than a
      pretrained encoder (from scratch every layer is new, and all share ``lr``).
    - ``freeze_epochs``: the encoder is held fixed (learning rate 0, BatchNorm statistics frozen)
      for this many epochs; an epoch is as many samples as there are training cases.

    The other defaults follow the Med3D paper's transfer recipe: Adam at a constant rate, no
    warm-up, no weight decay.
    """

    task: str = "seg"
    pretrained: str = "default"
    new_layers_lr_mult: float = 10.0
    freeze_epochs: int = 0
    # the base's settings, with the transfer recipe's defaults
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
        if not isinstance(self.pretrained, str) or not self.pretrained.strip():
            raise ConfigError(f"pretrained must be a tag, a file, 'default' or 'none', got {self.pretrained!r}")
        if self.lr is None:
            self.lr = PAPER_LR_SCRATCH if self.scratch else PAPER_LR_PRETRAINED
        super().__post_init__()  # type: ignore[misc]
        if check_number(self.new_layers_lr_mult, "new_layers_lr_mult") <= 0:
            raise ConfigError(f"new_layers_lr_mult must be > 0, got {self.new_layers_lr_mult!r}")
        check_int(self.freeze_epochs, "freeze_epochs", minimum=0)

    @property
    def scratch(self) -> bool:
        from ..weights.factory import is_random

        return is_random(self.pretrained)

    def replace(self, **changes: Any):
        if "pretrained" in changes and "lr" not in changes and self._lr_is_default():
            changes["lr"] = None  # the paper's rate for the new starting point
        return super().replace(**changes)  # type: ignore[misc]

    def _lr_is_default(self) -> bool:
        return self.lr == (PAPER_LR_SCRATCH if self.scratch else PAPER_LR_PRETRAINED)


# -- keys: each belongs to the runs whose dataclass has it ----------------------------------------

_RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}
_SECTIONS = (  # a section, the runs that take it, their commands
    (SegmentationSection, "segmentation runs", "`med3d train`, `med3d finetune seg`"),
    (ClassificationSection, "classification fine-tuning", "`med3d finetune cls`"),
    (TransferSection, "fine-tuning", "`med3d finetune seg|cls`"),
)
# key -> (the value a fine-tuning config of the other task holds, the runs, their commands). Fine-tuning
# configs saved by earlier versions listed the keys of both data sections; at these values they ask for nothing.
_HOMES: dict[str, tuple[Any, str, str]] = {
    f.name: ([] if f.default is dataclasses.MISSING else f.default, runs, commands)
    for section, runs, commands in _SECTIONS[:2] for f in dataclasses.fields(section) if f.name not in _RUN_KEYS
}
_HOMES["decoder"] = ("paper", "segmentation fine-tuning", "`med3d finetune seg`")
_HOMES.update({f.name: (dataclasses.MISSING, *_SECTIONS[2][1:])
               for f in dataclasses.fields(TransferSection) if f.name not in _RUN_KEYS})
_WHAT_TO_DO = {
    "intensity": "in a segmentation run it is set per task, under `tasks:` (`- name: ..., intensity: {...}`)",
    "spacing": "a segmentation run resamples each task to its median voxel spacing; remove the key",
    "num_classes": "in a segmentation run it is set per task, under `tasks:` (or with --num-classes)",
    "class_names": "a segmentation run takes the class names from the task's dataset.json `labels`",
}


def _accepted(cls: type, raw: dict, where: str) -> dict:
    """``raw`` without the other data section's keys at their saved defaults, or an error naming a
    key this run does not take and what to do."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    kept = {}
    for key, value in raw.items():
        home = _HOMES.get(key)
        if key in allowed:
            kept[key] = value
        elif home is not None and value == home[0] and issubclass(cls, TransferSection):
            continue  # a fine-tuning config saved by an earlier version: it asks for nothing
        elif home is not None:
            _, runs, commands = home
            todo = _WHAT_TO_DO.get(key, f"remove it, or run the recipe with {commands}")
            raise ConfigError(f"{where}: key {key!r} does not apply to {cls.run_name} (it is a setting of "
                              f"{runs}, {commands}), so it would be ignored; {todo}")
        else:
            _check_known({key: value}, allowed, where)
    return kept


def _check_known(raw: dict, allowed: list[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; accepted: {', '.join(allowed)}")


# -- the co-training ------------------------------------------------------------------------------

@dataclass
class TrainConfig(SegmentationSection, RunConfig):
    """The co-training (``med3d train``): one encoder, one decoder branch per MSD task."""

    run_name: typing.ClassVar[str] = "the co-training (`med3d train`)"

    def check_runnable(self) -> None:
        if not self.tasks:
            raise ConfigError(
                "no tasks: list them under `tasks:` in the config, or pass MSD task folders with "
                "--data FOLDER (repeatable)"
            )


# -- files ------------------------------------------------------------------------------------

def packaged_configs() -> list[str]:
    """Names of the config files shipped in ``med3d_hub/configs``."""
    folder = resources.files("med3d_hub") / "configs"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A local file if it exists, else the packaged config of that name (``configs/3dseg8.yaml``)."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    name = local.name if local.suffix in (".yaml", ".yml") else local.name + ".yaml"
    if local.parent in (Path("."), Path("configs")):
        packaged = resources.files("med3d_hub") / "configs" / name
        if packaged.is_file():
            return Path(str(packaged))
    raise ConfigError(
        f"config file {str(path)!r} not found; give a path to a YAML file or one of the packaged "
        f"configs: {', '.join('configs/' + n for n in packaged_configs())}"
    )


def read_config_file(path: str | os.PathLike) -> tuple[dict, str]:
    """A YAML config (local path or packaged name) as a mapping, and the file it came from."""
    import yaml

    resolved = resolve_config_path(path)
    try:
        raw = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{resolved}: not valid YAML ({err})") from err
    return (raw if raw is not None else {}), str(resolved)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a co-training config into a validated ``TrainConfig``."""
    raw, where = read_config_file(path)
    return TrainConfig.from_dict(raw, where=where)
