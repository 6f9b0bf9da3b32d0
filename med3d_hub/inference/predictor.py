"""What ``med3d predict`` applies: a network with a head, its preprocessing, class names and window.

The source of the model is one of (``load_predictor``):

- a finished ``med3d finetune`` run folder (``finetuned.safetensors``: the whole network, the
  paper's decoder included);
- a model folder (``config.json`` + ``model.safetensors`` with a head, as ``med3d export`` or
  ``save_pretrained`` write it);
- weights by name, ``resnet10.lits-ft`` (a manifest entry published with its head);
- a local weights file with the architecture given (``model="resnet10"``);
- a model object with a head.

The preprocessing is the source's own (what ``config.json`` or the manifest stores, the rule of
``med3d features``), never guessed. The class names are the run's (its labels), which an export's
``config.json`` and a published entry's ``source.class_names`` carry on, so every source of the
same weights names the classes alike; weights that name none get numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..data.preprocess import Preprocess, transforms_for
from ..errors import MissingFileError, UsageError

__all__ = ["DEFAULT_WINDOW", "Predictor", "Source", "load_predictor"]

DEFAULT_WINDOW = (64, 96, 96)  # the fine-tuning's default crop, for weights that do not say theirs
Source = Union[str, os.PathLike, nn.Module]


@dataclass
class Predictor:
    """A network with a head, and what applying it needs: task, class names, preprocessing, window."""

    net: nn.Module  # (N, 1, D, H, W) -> logits (N, K) or (N, K, D', H', W')
    task: str  # "seg" or "cls"
    class_names: list[str]
    preprocess: Preprocess
    window: tuple[int, int, int] | None  # the sliding window of a segmentation
    source: str

    def describe(self) -> str:
        what = "segmentation" if self.task == "seg" else "classification"
        window = f", windows of {' x '.join(map(str, self.window))}" if self.task == "seg" else ""
        return f"{what} into {len(self.class_names)} classes ({', '.join(self.class_names)}){window}"


def load_predictor(
    source: Source,
    *,
    model: str | None = None,
    preprocess: Preprocess | dict | None = None,
    window: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Predictor:
    """The ``Predictor`` of a run folder, a model folder, ``name.tag``, a weights file + ``model``, or a model.

    ``preprocess``, ``window`` and ``class_names`` replace what the source says.
    """
    if isinstance(source, nn.Module):
        found = _from_module(source, "the given model")
    else:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            found = _from_folder(path)
        elif path.is_file() or model is not None:
            found = _from_file(path, model)
        elif os.sep in text or "/" in text:
            raise MissingFileError(f"{text}: no such file or folder; give a fine-tuning run folder, a model folder, "
                                   "name.tag, or a weights file with --model")
        else:
            found = _from_name(text)
    if preprocess is not None:
        found.preprocess = transforms_for(preprocess)
    if window is not None:
        found.window = _window(window)
    if class_names is not None:
        if len(class_names) != len(found.class_names):
            raise UsageError(f"{len(class_names)} class names given, the model has {len(found.class_names)} classes")
        found.class_names = [str(n) for n in class_names]
    if found.preprocess.size is not None and found.task == "seg" and found.window is None:
        found.window = found.preprocess.size
    found.window = found.window or DEFAULT_WINDOW
    return found


def _window(values: Sequence[int]) -> tuple[int, int, int]:
    window = tuple(int(v) for v in values)
    if len(window) != 3 or any(v < 1 for v in window):
        raise UsageError(f"the window must be three positive sizes (D, H, W), got {tuple(values)}")
    return window


def _head(model: nn.Module) -> tuple[str, int]:
    """("seg" | "cls", classes) of a zoo model or a fine-tuning network; an encoder is an error."""
    task = getattr(model, "task", None)
    if task in ("seg", "cls") and hasattr(model, "num_classes"):
        return task, int(model.num_classes)
    if getattr(model, "seg_classes", None):
        return "seg", int(model.seg_classes)
    if getattr(model, "num_classes", 0):
        return "cls", int(model.num_classes)
    raise UsageError(
        "the model has no head (an encoder only), so there is nothing to predict; give a fine-tuning run folder "
        "(its finetuned.safetensors holds the decoder), or weights published with their head"
    )


def _numbered(task: str, classes: int) -> list[str]:
    return (["background"] if task == "seg" else ["0"]) + [str(c) for c in range(1, classes)]


def _from_module(model: nn.Module, source: str, preprocess=None, names=None, window=None) -> Predictor:
    task, classes = _head(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("head") == "new":
        raise UsageError(f"{source}: the weights carry no head of this shape, so the head is random; "
                         "give weights that were published with their head")
    if preprocess is None:
        preprocess = _stored_preprocess(model)
    stored = cfg.get("class_names") if isinstance(cfg, dict) else None  # config.json's, or a published entry's
    names = names or (stored if stored and len(stored) == classes else _numbered(task, classes))
    return Predictor(model.eval(), task, [str(n) for n in names], preprocess, window, source)


def _stored_preprocess(model: nn.Module) -> Preprocess:
    """The weights' preprocessing; weights that store none get their depth's default entry's (as ``features``)."""
    cfg = getattr(model, "pretrained_cfg", None)
    spec = cfg.get("preprocess") if isinstance(cfg, dict) else None
    if spec is not None:
        return transforms_for(spec)
    from ..weights.manifest import default_entry
    from ..weights.model_files import architecture_of

    try:
        return transforms_for(default_entry(architecture_of(model.block, model.layers)).preprocess)
    except (ValueError, AttributeError):
        return transforms_for(None)


def _from_folder(path: Path) -> Predictor:
    from ..weights import finetuned, model_files

    if finetuned.is_finetune_run(path):
        run = finetuned.read_finetuned(path)
        if run.preprocess is None:
            raise MissingFileError(f"{path} has no {model_files.CONFIG_NAME}, which holds the preprocessing of the "
                                   "weights; the run did not finish")
        names = _class_names(run.training, run.task, run.net.num_classes, run.class_names)
        return Predictor(run.net, run.task, names, transforms_for(run.preprocess), run.crop, str(path))
    config_file, weights = path / model_files.CONFIG_NAME, path / model_files.WEIGHTS_NAME
    if not (config_file.is_file() and weights.is_file()):
        raise MissingFileError(f"{path} is neither a fine-tuning run (finetuned.safetensors) nor a model folder "
                               f"({model_files.CONFIG_NAME} + {model_files.WEIGHTS_NAME})")
    from functools import partial

    from ..weights.hub_model import build_model
    from ..weights.loader import load_model

    config = model_files.read_config(config_file)
    arch, saved = model_files.resolve_saved(path, config=config)
    model = load_model(partial(build_model, arch), saved, head="exact")  # the network exactly as saved
    task, classes = _head(model)
    training = finetuned.read_training_config(path) or {}
    crop = training.get("crop")
    names = _class_names(training, task, classes, config.get("class_names"))
    return _from_module(model, str(path), names=names, window=_window(crop) if crop else None)


def _class_names(training: dict, task: str, classes: int, given: list[str] | None) -> list[str]:
    """The run's class names: those stored with the weights, else its labels (dataset.json of a segmentation
    task, class_names of a classification), as a run finished before the weights stored them has them."""
    if given and len(given) == classes and given != [str(c) for c in range(classes)]:
        return list(given)
    if task == "cls" and isinstance(training.get("class_names"), list) and len(training["class_names"]) == classes:
        return [str(n) for n in training["class_names"]]
    tasks = training.get("tasks") or []
    if task == "seg" and tasks and isinstance(tasks[0], dict) and tasks[0].get("path"):
        folder = Path(os.path.expanduser(str(tasks[0]["path"])))
        if not folder.is_absolute() and training.get("data_root"):
            folder = Path(os.path.expanduser(str(training["data_root"]))) / folder
        from ..files import read_json

        try:
            labels = (read_json(folder / "dataset.json", default={}) or {}).get("labels")
        except (OSError, ValueError):
            labels = None
        if isinstance(labels, dict) and len(labels) == classes:
            return [str(labels.get(str(c), c)) for c in range(classes)]
    return list(given) if given and len(given) == classes else _numbered(task, classes)


def _from_file(path: Path, model: str | None) -> Predictor:
    if model is None:
        raise UsageError(f"{path} is a weights file: give its architecture too (--model resnet10)")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such weights file")
    from ..weights.factory import create_model

    head = _file_head(path)
    if head is None:
        raise UsageError(f"{path} holds no head (fc.* or conv_seg.*): an encoder has nothing to predict")
    return _from_module(create_model(model, pretrained=str(path), **head), str(path))


def _file_head(path: Path) -> dict | None:
    """The head a weights file holds: ``{"num_classes": K}``, ``{"seg_classes": K}`` (with ``in_chans`` when
    its first conv takes several channels) or None."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k.removeprefix("module."): f.get_slice(k).get_shape() for k in f.keys()}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        shapes = {k.removeprefix("module."): list(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    conv1 = shapes.get("conv1.weight")
    channels = {"in_chans": int(conv1[1])} if conv1 is not None and len(conv1) > 1 and int(conv1[1]) > 1 else {}
    if "fc.weight" in shapes:
        return {"num_classes": int(shapes["fc.weight"][0]), **channels}
    seg = sorted(k for k in shapes if k.startswith("conv_seg.") and k.endswith(".weight"))
    return {"seg_classes": int(shapes[seg[-1]][0]), **channels} if seg else None


def _from_name(name: str) -> Predictor:
    from ..weights.factory import create_model

    return _from_module(create_model(name, pretrained=True), name)

