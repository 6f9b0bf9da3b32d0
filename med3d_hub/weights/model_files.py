"""The files of a saved Med3D network: ``model.safetensors`` and ``config.json``.

One layout serves ``model.save_pretrained`` / ``Med3DResNet.from_pretrained`` (huggingface_hub's
``PyTorchModelHubMixin``, on the classes of ``hub_model``), ``med3d export`` and ``med3d publish``:

- ``model.safetensors``: the model's state dict under the zoo's key names (MedicalNet's backbone
  names without ``module.``, plus ``fc.*`` or ``conv_seg.*`` when the model has a head). Dense,
  contiguous tensors that share no storage, keys sorted, BatchNorm running statistics included.
- ``config.json``: the constructor arguments that rebuild the network (``MODEL_ARGS``: block,
  layers, shortcut, in_chans, num_classes, seg_classes, seg_upsample, dilated, drop_rate,
  drop_path_rate; ``out_indices`` for feature extractors), which is what the mixin's
  ``from_pretrained`` passes to the class, and descriptive keys for people and other tools
  (``DESCRIPTIVE_KEYS``: architecture, depth, strides, dilation, output_stride, num_features,
  preprocess, format, and ``class_names``, the head's classes in index order when they are named).

Loading is strict by default: every key of the model must be in the file with its shape, and the
file may hold nothing else. Errors name the keys and, for heads, the argument that fixes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import Med3DError, MissingFileError, UsageError
from ..networks import registry
from ..networks.registry import architecture_of
from ..networks.resnet import DILATED_LAYOUT, STRIDED_LAYOUT
from .checkpoints import HEAD_PREFIXES, CheckpointMismatchError, check_backbone
from .pretrained_cfg import PretrainedCfg

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "DESCRIPTIVE_KEYS",
    "MODEL_ARGS",
    "NonFiniteWeightsError",
    "WEIGHTS_NAME",
    "architecture_of",
    "check_finite",
    "check_state_dict",
    "create_model_kwargs",
    "file_state_dict",
    "load_pretrained",
    "model_config",
    "read_config",
    "write_model_files",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_FORMAT = "med3d_hub.resnet.v1"
MODEL_ARGS = ("block", "layers", *registry.MODEL_ARGS)  # config.json keys that rebuild the network
DESCRIPTIVE_KEYS = (
    "format", "architecture", "depth", "strides", "dilation", "output_stride", "num_features", "preprocess",
    "class_names",
)  # fmt: skip
_SHOWN = 8


class NonFiniteWeightsError(Med3DError, ValueError):
    """The weights hold NaN or infinite values; the message names the tensors."""


# -- config.json --------------------------------------------------------------------------------------


def model_config(model: nn.Module, preprocess: Mapping | None = None, class_names: Sequence[str] | None = None) -> dict:
    """config.json of a zoo model, from the model as it is now (a head swapped later is recorded).

    ``preprocess`` and ``class_names`` default to those of the model's ``pretrained_cfg``, when it
    has them; names are kept only for a head with that many classes.
    """
    from ..networks.resnet import Med3DResNet, Med3DResNetFeatures

    if not isinstance(model, Med3DResNet):
        raise TypeError(f"expected a Med3D ResNet (med3d_hub.create_model), got {type(model).__name__}")
    arch = architecture_of(model.block, model.layers)
    layout = DILATED_LAYOUT if model.dilated else STRIDED_LAYOUT
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, Mapping) else {}
    if preprocess is None:
        preprocess = cfg.get("preprocess")
    if class_names is None:
        class_names = cfg.get("class_names")
    classes = model.seg_classes or model.num_classes
    config: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "architecture": arch,
        "depth": int(arch.removeprefix("resnet")) if arch else None,
        "block": model.block,
        "layers": list(model.layers),
        "shortcut": model.shortcut,
        "in_chans": model.in_chans,
        "num_classes": model.num_classes,
        "seg_classes": model.seg_classes,
        "seg_upsample": model.seg_upsample,
        "dilated": model.dilated,
        "strides": [s for s, _ in layout],
        "dilation": [d for _, d in layout],
        "output_stride": 4 * math.prod(s for s, _ in layout),
        "num_features": model.num_features,
        "drop_rate": model.drop_rate,
        "drop_path_rate": model.drop_path_rate,
        "preprocess": _plain(preprocess) if preprocess is not None else None,
        "class_names": [str(n) for n in class_names] if class_names and len(class_names) == classes else None,
    }
    if isinstance(model, Med3DResNetFeatures):
        config["out_indices"] = list(model.out_indices)
    return config


def read_config(path: str | os.PathLike) -> dict:
    """Read and check a config.json; errors name the file and the key."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MissingFileError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: a model config is a JSON object, got {type(config).__name__}")
    missing = [k for k in ("block", "layers") if k not in config]
    if missing:
        raise UsageError(
            f"{path} is not a Med3D model config: missing {', '.join(missing)} "
            "(write one with model.save_pretrained(folder) or `med3d export`)"
        )
    if architecture_of(config["block"], config["layers"]) is None:
        raise UsageError(f"{path}: block {config['block']!r} with layers {config['layers']!r} is not a zoo architecture")
    return config


_DEFAULTS = {"in_chans": 1, "seg_upsample": False, "dilated": True, "drop_rate": 0.0, "drop_path_rate": 0.0}


def create_model_kwargs(config: Mapping) -> dict:
    """The ``create_model`` options that rebuild the network of a config: the head and every non-default setting.

    The architecture and block counts are in the model name; options at their defaults are left out,
    except ``num_classes``, whose default (2) differs from an encoder's 0.
    """
    kwargs = {k: config[k] for k in MODEL_ARGS if k in config and k not in ("block", "layers")}
    if kwargs.get("seg_classes") is not None:
        kwargs.pop("num_classes", None)
    else:
        kwargs.pop("seg_classes", None)
        kwargs.pop("seg_upsample", None)
    return {k: v for k, v in kwargs.items() if not (k in _DEFAULTS and v == _DEFAULTS[k])}


# -- weights ------------------------------------------------------------------------------------------


def file_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What goes into a safetensors file: CPU, contiguous, row-major copies that share nothing, keys sorted."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(state_dict.items())}


def check_finite(state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse weights with NaN or infinite values, naming the tensors."""
    bad = {}
    for key, value in state_dict.items():
        if (value.is_floating_point() or value.is_complex()) and not _sum_is_finite(value):
            count = int((~torch.isfinite(value)).sum())  # exact, for the rare tensor whose sum is not finite
            if count:
                bad[key] = count
    if bad:
        keys = sorted(bad)
        shown = ", ".join(f"{k} ({bad[k]} of {state_dict[k].numel()})" for k in keys[:_SHOWN])
        more = f" and {len(keys) - _SHOWN} more tensors" if len(keys) > _SHOWN else ""
        raise NonFiniteWeightsError(
            f"the weights in {source} hold NaN or infinite values: {shown}{more}. The run diverged or the file is "
            "damaged; publish an earlier checkpoint (--checkpoint) or retrain with a lower learning rate."
        )


def _sum_is_finite(value: torch.Tensor) -> bool:
    """One cheap pass: any NaN or infinity makes the sum non-finite (a finite sum proves all values finite).

    numpy's reduction, because it runs at memory speed where torch's elementwise checks do not.
    """
    if value.dtype in (torch.float32, torch.float64, torch.float16) and value.device.type == "cpu":
        import numpy as np

        return bool(np.isfinite(value.detach().numpy().sum(dtype=np.float64)))
    return bool(torch.isfinite(value.detach().sum()))


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strict check of a whole state dict (backbone and head) against a model; errors name the keys."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model_head = sorted(k for k in shapes if k.startswith(HEAD_PREFIXES))
    file_head = sorted(k for k in state_dict if k.startswith(HEAD_PREFIXES))
    if model_head != file_head or any(tuple(state_dict[k].shape) != shapes[k] for k in file_head):
        raise CheckpointMismatchError(
            f"the head in {source} ({_head_of(state_dict)}) differs from the model's ({_head_of(model.state_dict())}); "
            "build the model with the head of the file (num_classes=..., seg_classes=...), or load with strict=False "
            "to keep a fresh head"
        )
    check_backbone(
        {k: v for k, v in shapes.items() if k not in model_head},
        {k: v for k, v in state_dict.items() if k not in file_head},
        source=source,
    )


def _head_of(state_dict: Mapping[str, torch.Tensor]) -> str:
    if "fc.weight" in state_dict:
        return f"linear head fc with {state_dict['fc.weight'].shape[0]} classes"
    seg = sorted(k for k in state_dict if k.startswith("conv_seg.") and k.endswith(".weight"))
    if seg:
        return f"segmentation head conv_seg with {state_dict[seg[-1]].shape[0]} classes"
    return "no head"


def write_model_files(folder: str | os.PathLike, model: nn.Module, *, preprocess: Mapping | None = None,
                      class_names: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``model.safetensors`` and ``config.json`` of ``model`` into ``folder``; returns both paths.

    The same weights always give the same bytes (so the same sha256): the safetensors header holds
    only ``{"format": "pt"}`` (safetensors writes a larger metadata dict in no fixed order), and
    everything else about the model is in config.json.
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(model, preprocess, class_names)
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    weights.write_bytes(save(file_state_dict(model.state_dict()), metadata={"format": "pt"}))
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return weights, config_path


def load_pretrained(
    cls: type,
    model_id: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    force_download: bool,
    local_files_only: bool,
    token: str | bool | None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    model_kwargs: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The weights step of ``Med3DResNet.from_pretrained``.

    The mixin has read config.json: ``config`` is the whole file, ``model_kwargs`` the constructor
    arguments (from the file, or given by the caller).
    """
    from safetensors.torch import load_file

    kwargs = {k: v for k, v in model_kwargs.items() if k not in DESCRIPTIVE_KEYS}
    if "block" not in kwargs or "layers" not in kwargs:
        raise MissingFileError(
            f"{model_id} has no usable {CONFIG_NAME} (block and layers are missing): it was not written by "
            "model.save_pretrained or `med3d export`"
        )
    folder = Path(model_id)
    if folder.is_dir():
        path = folder / WEIGHTS_NAME
        if not path.is_file():
            raise MissingFileError(f"{folder} has no {WEIGHTS_NAME}; save one with model.save_pretrained({str(folder)!r})")
        where = str(path)
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(
            model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir, force_download=force_download,
            token=token, local_files_only=local_files_only,
        ))  # fmt: skip
        where = f"hf://{model_id}@{revision or 'main'}/{WEIGHTS_NAME}"
    model = cls(**kwargs)
    state = load_file(str(path))
    features_only = getattr(model, "out_indices", None) is not None
    if features_only:  # a feature extractor has no head: a head in the file is left out
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    if strict:
        check_state_dict(model, state, source=where)
        model.load_state_dict(state, strict=True)
    else:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        fitting = {k: v for k, v in state.items() if shapes.get(k) == tuple(v.shape)}
        model.load_state_dict(fitting, strict=False)
        kept, ignored = sorted(set(shapes) - set(fitting)), sorted(set(state) - set(fitting))
        if kept or ignored:
            log.warning("loaded %s with strict=False: %d tensors of the model kept as initialised (%s), %d tensors of "
                        "the file ignored (%s)", where, len(kept), ", ".join(kept[:4]), len(ignored), ", ".join(ignored[:4]))
    model.to(map_location)
    model.eval()
    from ..data.preprocess import PAPER_PREPROCESS, Preprocess
    from ..files import sha256_file

    preprocess = (config or {}).get("preprocess")
    conv1 = state.get("conv1.weight")
    head = None if not any(k.startswith(HEAD_PREFIXES) for k in model.state_dict()) else (
        "pretrained" if any(k.startswith(HEAD_PREFIXES) for k in state) else "new")
    arch = architecture_of(model.block, model.layers)
    prep = Preprocess.from_dict(PAPER_PREPROCESS if preprocess is None else preprocess).to_dict()
    cfg = PretrainedCfg(
        name=arch,
        architecture=arch,
        hf_hub_id=None if folder.is_dir() else model_id,
        revision=None if folder.is_dir() else (revision or "main"),
        filename=WEIGHTS_NAME,
        sha256=sha256_file(path),
        size=path.stat().st_size,
        format="safetensors",
        preprocess=prep,
        shortcut=model.shortcut,
        weights_in_chans=int(conv1.shape[1]) if conv1 is not None else None,
        in_chans=model.in_chans,
        file=str(path) if folder.is_dir() else None,
        head=head,
        class_names=(config or {}).get("class_names") if head == "pretrained" else None,
    ).to_dict()
    model.pretrained_cfg = {**model.data_cfg(prep.get("size")), **cfg}
    return model


def _plain(value: Any) -> Any:
    """A JSON round trip: tuples become lists, mappings become dicts."""
    return json.loads(json.dumps(value))
