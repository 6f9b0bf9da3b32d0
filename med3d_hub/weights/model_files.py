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
  ``architecture`` is timm's name of the model (``med3d_resnet18``), so that
  ``timm.create_model("local-dir:<folder>")`` and ``"hf-hub:<repo>"`` build this network (see
  ``timm_models``); files written before say ``resnet18``. Our readers take the architecture from
  block and layers (``zoo_architecture``), so both read the same.

``resolve_saved`` finds and reads a saved folder or Hub repo; ``loader.load_model`` builds the model
with it (strict by default: every key of the model in the file with its shape, nothing else; errors
name the keys and, for heads, the argument that fixes them).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import MissingFileError, UsageError
from ..networks import registry
from ..networks.registry import TIMM_PREFIX, architecture_of
from ..networks.resnet import DILATED_LAYOUT, STRIDED_LAYOUT
from .checkpoints import NonFiniteWeightsError, check_finite
from .loader import ResolvedWeights
from .pretrained_cfg import PretrainedCfg

__all__ = [
    "CONFIG_NAME",
    "DESCRIPTIVE_KEYS",
    "MODEL_ARGS",
    "NonFiniteWeightsError",
    "WEIGHTS_NAME",
    "architecture_of",
    "check_finite",
    "config_model_kwargs",
    "create_model_kwargs",
    "file_state_dict",
    "model_config",
    "read_config",
    "read_saved_config",
    "resolve_saved",
    "write_model_files",
    "zoo_architecture",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_FORMAT = "med3d_hub.resnet.v1"
MODEL_ARGS = ("block", "layers", *registry.MODEL_ARGS)  # config.json keys that rebuild the network
DESCRIPTIVE_KEYS = (
    "format", "architecture", "depth", "strides", "dilation", "output_stride", "num_features", "preprocess",
    "class_names",
)  # fmt: skip


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
        "architecture": TIMM_PREFIX + arch,
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


def zoo_architecture(config: Mapping) -> str | None:
    """The zoo's name (``resnet18``) of a config's network, from block and layers: the same for every format."""
    return architecture_of(config["block"], config["layers"])


_DEFAULTS = {"in_chans": 1, "seg_upsample": False, "dilated": True, "drop_rate": 0.0, "drop_path_rate": 0.0}


def config_model_kwargs(config: Mapping) -> tuple[str, dict]:
    """The architecture and ``create_model`` options of a config, ``features_only`` when it has ``out_indices``."""
    arch = zoo_architecture(config)
    if arch is None:
        raise UsageError(f"block {config['block']!r} with layers {config['layers']!r} is not a zoo architecture")
    kwargs = create_model_kwargs(config)
    if config.get("out_indices") is not None:
        kwargs.update(features_only=True, out_indices=tuple(config["out_indices"]))
        for key in ("num_classes", "seg_classes", "seg_upsample"):
            kwargs.pop(key, None)
    return arch, kwargs


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


# -- reading a saved model back ------------------------------------------------------------------------


def _saved_file(where: str | os.PathLike, filename: str, hub_args: Mapping[str, Any]) -> tuple[Path, str | None, str | None]:
    """A file of a saved folder, or of a Hub repo ``org/name[@revision]`` (huggingface_hub downloads and caches it).

    Returns the local path, and the repo and revision when it came from the Hub.
    """
    folder = Path(where)
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise MissingFileError(f"{folder} has no {filename}; save one with model.save_pretrained({str(folder)!r})")
        return path, None, None
    from huggingface_hub import hf_hub_download

    repo_id, _, at = str(where).partition("@")
    revision = hub_args.get("revision") or at or None
    args = {k: v for k, v in hub_args.items() if k != "revision" and v is not None}
    return Path(hf_hub_download(repo_id, filename, revision=revision, **args)), repo_id, revision or "main"


def read_saved_config(where: str | os.PathLike, **hub_args: Any) -> dict:
    """config.json of a saved folder or Hub repo, checked (``read_config``)."""
    return read_config(_saved_file(where, CONFIG_NAME, hub_args)[0])


def resolve_saved(where: str | os.PathLike, *, config: Mapping | None = None, **hub_args: Any) -> tuple[str, ResolvedWeights]:
    """The architecture and the weights of a saved folder or Hub repo, for ``loader.load_model``.

    ``config``: the config.json the caller has already read (``from_pretrained``). ``hub_args``:
    huggingface_hub's ``revision``, ``cache_dir``, ``force_download``, ``local_files_only``, ``token``.
    The weights' settings are the config's (``config_model_kwargs``), their preprocessing the config's.
    """
    from safetensors.torch import load_file

    from ..data.preprocess import PAPER_PREPROCESS, Preprocess
    from ..files import sha256_file

    config = read_saved_config(where, **hub_args) if config is None else config
    arch, kwargs = config_model_kwargs(config)
    path, repo_id, revision = _saved_file(where, WEIGHTS_NAME, hub_args)
    preprocess = config.get("preprocess")
    cfg = PretrainedCfg(
        name=arch, architecture=arch, hf_hub_id=repo_id, revision=revision, filename=WEIGHTS_NAME,
        sha256=sha256_file(path), size=path.stat().st_size, format="safetensors",
        preprocess=Preprocess.from_dict(PAPER_PREPROCESS if preprocess is None else preprocess).to_dict(),
        file=None if repo_id else str(path), class_names=config.get("class_names"),
    )  # fmt: skip
    source = f"hf://{repo_id}@{revision}/{WEIGHTS_NAME}" if repo_id else str(path)
    return arch, ResolvedWeights(load_file(str(path)), cfg, source, kwargs)


def _plain(value: Any) -> Any:
    """A JSON round trip: tuples become lists, mappings become dicts."""
    return json.loads(json.dumps(value))
