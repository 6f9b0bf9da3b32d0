"""The co-training configuration: one dataclass, read from YAML, overridden by command-line flags.

A config file holds the keys of ``TrainConfig``; ``tasks`` is a list of ``TaskConfig`` mappings.
Unknown keys are errors that list the accepted ones, so a typo never silently falls back to a
default. ``--config configs/3dseg8.yaml`` also finds the file shipped inside the package when no
such local path exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import Med3DError

__all__ = ["ConfigError", "TaskConfig", "TrainConfig", "load_config", "resolve_config_path", "packaged_configs"]


class ConfigError(Med3DError, ValueError):
    """A configuration value or file is invalid; the message names the key."""


@dataclass
class TaskConfig:
    """One dataset of the co-training: an MSD task folder and how to read it.

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
            _check_int(self.num_classes, f"{where}.num_classes", minimum=2)
        if self.channel is not None:
            _check_int(self.channel, f"{where}.channel", minimum=0)
        _check_int(self.weight, f"{where}.weight", minimum=1)
        if self.crop is not None:
            self.crop = _triple(self.crop, f"{where}.crop")
        if self.intensity is not None and not isinstance(self.intensity, dict):
            raise ConfigError(f"{where}.intensity must be a mapping such as {{method: percentile_zscore}}")


@dataclass
class TrainConfig:
    """Every setting of a co-training run. Sizes are D, H, W; steps count optimiser updates."""

    tasks: list[TaskConfig] = field(default_factory=list)
    model: str = "resnet10"
    data_root: str = "."
    cache_dir: str | None = None
    output: str = "runs/cotrain"
    # sampling and batches
    steps: int = 1000
    batch_size: int = 2
    accum_steps: int = 1
    crop: tuple[int, int, int] = (64, 128, 128)
    foreground_prob: float = 0.33
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
    val_overlap: float = 0.25
    sw_batch_size: int = 2
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    skip_bad_cases: bool = False
    dist_timeout_min: float = 60.0

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, TaskConfig) else _task_from_dict(t, i) for i, t in enumerate(self.tasks)]
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"task names must be unique; repeated: {', '.join(dupes)}")
        from ..networks.registry import list_models

        if self.model not in list_models():
            raise ConfigError(f"model must be one of {', '.join(list_models())}, got {self.model!r}")
        for key in ("steps", "batch_size", "accum_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                    "val_every", "sw_batch_size"):
            _check_int(getattr(self, key), key, minimum=1)
        for key in ("warmup_steps", "workers", "seed"):
            _check_int(getattr(self, key), key, minimum=0)
        if self.val_max_cases is not None:
            _check_int(self.val_max_cases, "val_max_cases", minimum=1)
        self.crop = _triple(self.crop, "crop")
        _check_range(self.foreground_prob, "foreground_prob", 0.0, 1.0)
        _check_range(self.val_fraction, "val_fraction", 0.0, 0.9)
        _check_range(self.val_overlap, "val_overlap", 0.0, 0.95)
        for key in ("lr", "dist_timeout_min"):
            if _number(getattr(self, key), key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("momentum", "weight_decay", "warmup_lr", "min_lr", "poly_power"):
            if _number(getattr(self, key), key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.grad_clip is not None and _number(self.grad_clip, "grad_clip") <= 0:
            raise ConfigError(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip!r}")
        _check_choice(self.optimizer, "optimizer", ("sgd", "adam", "adamw"))
        _check_choice(self.schedule, "schedule", ("cosine", "poly", "constant"))
        _check_choice(self.amp, "amp", ("auto", "none", "bf16", "fp16"))
        _check_choice(self.dist_backend, "dist_backend", ("auto", "nccl", "gloo"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for key in ("augment", "channels_last", "grad_checkpointing", "deterministic", "skip_bad_cases"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")

    def check_runnable(self) -> None:
        """Errors that only matter when training starts (a config file may leave tasks to flags)."""
        if not self.tasks:
            raise ConfigError(
                "no tasks: list them under `tasks:` in the config, or pass MSD task folders with "
                "--data FOLDER (repeatable)"
            )

    def crop_for(self, task: TaskConfig) -> tuple[int, int, int]:
        return task.crop or self.crop

    def task_path(self, task: TaskConfig) -> Path:
        """The task folder; relative paths are taken from ``data_root``."""
        path = Path(os.path.expandvars(os.path.expanduser(task.path)))
        if not path.is_absolute():
            path = Path(os.path.expandvars(os.path.expanduser(self.data_root))) / path
        return path

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples), ready for YAML, JSON and checkpoints."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> TrainConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
        _check_keys(raw, cls, where)
        try:
            return cls(**raw)
        except TypeError as err:  # a wrong type that dataclasses noticed before our checks
            raise ConfigError(f"{where}: {err}") from err

    def replace(self, **changes: Any) -> TrainConfig:
        _check_keys(changes, type(self), "override")
        return dataclasses.replace(self, **changes)


def _task_from_dict(raw: Any, index: int) -> TaskConfig:
    where = f"tasks[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with at least `name` and `path`, got {raw!r}")
    _check_keys(raw, TaskConfig, where)
    missing = [k for k in ("name", "path") if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    return TaskConfig(**raw)


def _check_keys(raw: dict, cls: type, where: str) -> None:
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; accepted: {', '.join(allowed)}")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _check_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _check_range(value: Any, key: str, low: float, high: float) -> None:
    if not low <= _number(value, key) <= high:
        raise ConfigError(f"{key} must lie in [{low}, {high}], got {value!r}")


def _check_choice(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _triple(value: Any, key: str) -> tuple[int, int, int]:
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ConfigError(f"{key} must be three positive integers D, H, W, got {value!r}")
    return items  # type: ignore[return-value]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML config (local path or packaged name) into a validated ``TrainConfig``."""
    import yaml

    resolved = resolve_config_path(path)
    try:
        raw = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{resolved}: not valid YAML ({err})") from err
    return TrainConfig.from_dict(raw or {}, where=str(resolved))
