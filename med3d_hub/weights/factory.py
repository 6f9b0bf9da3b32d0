"""The one door to a model: `create_model` builds the network by name, then asks the loader for weights.

`resolve_pretrained` is the one reading of a `--pretrained` value (the `med3d` commands, `pretrained:` in
fine-tuning recipes), with one vocabulary, documented in docs/pretrained.md:

| value | means |
| --- | --- |
| `default`, `true`, `yes`, `on` (or no value) | the weights of the name's tag, or the depth's default |
| `none`, `false`, `random`, `scratch`, `no`, `off` | random weights |
| `hf://org/repo@revision/file` | that file on the Hub |
| a path (it exists, has a `/`, or ends in .pth .pt .bin .safetensors .ckpt) | that local file |
| anything else | a weights tag: `--model resnet50 --pretrained 3dseg8` is `resnet50.3dseg8` |
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import MissingFileError, UsageError
from ..networks.registry import split_name
from .hub_model import build_model


def create_model(name: str, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """Build a Med3D ResNet by name, optionally with pretrained weights.

    Args:
        name: `resnet{10,18,34,50,101,152,200}`, optionally with a weights tag (`resnet50.3dseg8`).
        pretrained: False for random weights; True for the tag's (or the depth's default) weights;
            a local file path or an `hf://org/repo@rev/file` reference.
        **kwargs: `num_classes`, `seg_classes`, `seg_upsample`, `in_chans`, `shortcut`, `dilated`,
            `drop_rate`, `drop_path_rate`, `features_only`, `out_indices`.
    """
    arch, tag = split_name(name)
    if pretrained is False or pretrained is None:
        return build_model(arch, **kwargs)  # its pretrained_cfg holds timm's data keys and no weights (no sha256)
    from .loader import load_model  # the Hub layer loads only when weights are asked for
    from .pretrained import LOADER_ARGS, resolve_weights

    loader = {k: kwargs.pop(k) for k in LOADER_ARGS if k in kwargs}
    return load_model(partial(build_model, arch), resolve_weights(arch, tag, pretrained, **loader), **kwargs)


def create_saved_model(where: str | os.PathLike, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """The network saved in a folder (``model.save_pretrained``, ``med3d export``) or a Hub repo ``org/name[@revision]``.

    config.json rebuilds it (head and settings); ``kwargs`` override it as in ``create_model`` (a head
    argument replaces the saved head), and a head the weights lack is initialised afresh.
    ``pretrained=False`` keeps the settings and not the weights. timm's ``local-dir:`` and ``hf-hub:`` come here.
    """
    from .loader import load_model, over_saved_kwargs
    from .model_files import config_model_kwargs, read_saved_config, resolve_saved
    from .pretrained import LOADER_ARGS

    loader = {k: kwargs.pop(k) for k in LOADER_ARGS if k in kwargs}
    if not pretrained:
        arch, saved = config_model_kwargs(read_saved_config(where, **loader))
        return build_model(arch, **over_saved_kwargs(saved, kwargs))
    arch, weights = resolve_saved(where, **loader)
    return load_model(partial(build_model, arch), weights, **kwargs)


DEFAULT_WORDS = frozenset({"default", "true", "yes", "on"})
RANDOM_WORDS = frozenset({"none", "false", "random", "scratch", "no", "off"})
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def is_random(pretrained: str | None) -> bool:
    """True when a `--pretrained` value asks for random weights."""
    return pretrained is not None and str(pretrained).strip().lower() in RANDOM_WORDS


def resolve_pretrained(model: str, pretrained: str | None) -> tuple[str, bool | str]:
    """`--model` and `--pretrained` -> the `create_model` name and `pretrained` argument (see the table above)."""
    arch, tag = split_name(model)
    text = None if pretrained is None else str(pretrained).strip()
    if text is None or text.lower() in DEFAULT_WORDS:
        return model, True
    if text.lower() in RANDOM_WORDS:
        return arch, False
    if text.startswith("hf://"):
        return arch, text
    path = Path(text).expanduser()
    if path.exists() or os.sep in text or "/" in text or text.lower().endswith(WEIGHT_SUFFIXES):
        if not path.is_file():
            raise MissingFileError(f"--pretrained {text}: no such file (give a MedicalNet .pth or a .safetensors file)")
        return arch, str(path)
    if tag is not None and tag != text:
        raise UsageError(f"--model {model} already names the weights {tag!r}; --pretrained {text} disagrees")
    return f"{arch}.{text}", True
