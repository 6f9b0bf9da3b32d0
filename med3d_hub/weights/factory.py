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
    from .pretrained import create_pretrained  # the Hub layer loads only when weights are asked for

    return create_pretrained(arch, tag, pretrained, **kwargs)


def create_saved_model(where: str | os.PathLike, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """The network saved in a folder (``model.save_pretrained``, ``med3d export``) or a Hub repo ``org/name[@revision]``.

    config.json rebuilds it (head and settings); ``kwargs`` override it as in ``create_model`` (a head
    argument replaces the saved head). ``pretrained=True`` loads model.safetensors as ``create_model``
    loads a file, with the preprocessing config.json records. timm's ``local-dir:`` and ``hf-hub:`` come here.
    """
    from . import model_files

    config, weights = model_files.locate_saved(where, **{k: kwargs[k] for k in ("cache_dir", "token") if k in kwargs})
    arch, saved = model_files.config_model_kwargs(config)
    if any(k in kwargs for k in ("num_classes", "seg_classes", "seg_upsample", "features_only")):
        saved = {k: v for k, v in saved.items() if k not in ("num_classes", "seg_classes", "seg_upsample", "features_only", "out_indices")}
    kwargs = {**saved, **kwargs}
    if not pretrained:
        for key in ("cache_dir", "local_files_only", "token"):
            kwargs.pop(key, None)
        return build_model(arch, **kwargs)
    from .pretrained import create_pretrained

    model = create_pretrained(arch, None, weights, **kwargs)
    model.pretrained_cfg["preprocess"] = config.get("preprocess") or model.pretrained_cfg["preprocess"]
    return model


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
