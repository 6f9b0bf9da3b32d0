"""The model classes users hold, and `build_model`, which makes them with random weights.

`Med3DResNet` and `Med3DResNetFeatures` are the networks of `med3d_hub.networks` with huggingface_hub's
`PyTorchModelHubMixin` on top: ``model.save_pretrained(folder)`` writes ``model.safetensors`` and a
``config.json`` of the network as it is now; ``Med3DResNet.from_pretrained(folder or "org/name")``
rebuilds it and loads strictly through the one loader (``loader.load_model``; ``strict=False`` keeps
keys the file lacks as initialised); ``push_to_hub`` uploads the same files. The files are
`model_files`' business.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Mapping

from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import MissingFileError, UsageError
from ..networks import resnet
from ..networks.registry import FEATURE_ARGS, MODEL_ARGS, architecture_of
from ..networks.resnet import ARCHITECTURES
from .loader import load_model
from .model_files import CONFIG_NAME, DESCRIPTIVE_KEYS, config_model_kwargs, resolve_saved, write_model_files

__all__ = ["Med3DResNet", "Med3DResNetFeatures", "build_from_config", "build_model"]


# Model-card fields for PyTorchModelHubMixin. huggingface_hub gained them over its versions (paper_url
# in 0.31), so only those the installed one accepts are passed.
_HUB_CARD = {
    "library_name": "med3d-hub",
    "tags": ["medical-imaging", "3d", "med3d", "resnet"],
    "paper_url": "https://arxiv.org/abs/1904.00625",
}
_HUB_CARD = {k: v for k, v in _HUB_CARD.items() if k in inspect.signature(PyTorchModelHubMixin.__init_subclass__).parameters}


class Med3DResNet(resnet.Med3DResNet, PyTorchModelHubMixin, **_HUB_CARD):
    __doc__ = resnet.Med3DResNet.__doc__

    # PyTorchModelHubMixin's hooks: config.json from the model as it is, strict loading
    def _save_pretrained(self, save_directory) -> None:
        write_model_files(save_directory, self)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token,
                         map_location="cpu", strict: bool = True, config=None, proxies=None, resume_download=None,
                         **model_kwargs):
        # proxies and resume_download: what huggingface_hub 0.x passes too; they do not change what is loaded.
        # model_kwargs: config.json's constructor arguments, with the caller's over them (the mixin merged them).
        kwargs = {k: v for k, v in model_kwargs.items() if k not in DESCRIPTIVE_KEYS}
        block, layers = kwargs.pop("block", None), kwargs.pop("layers", None)
        if block is None or layers is None:
            raise MissingFileError(
                f"{model_id} has no usable {CONFIG_NAME} (block and layers are missing): it was not written by "
                "model.save_pretrained or `med3d export`"
            )
        _, weights = resolve_saved(
            model_id, config={**(config or {}), "block": block, "layers": layers}, revision=revision,
            cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only, token=token,
        )  # fmt: skip
        features = issubclass(cls, resnet.Med3DResNetFeatures)
        if features:
            kwargs = {"features_only": True, **{k: v for k, v in kwargs.items() if k not in ("num_classes", "seg_classes", "seg_upsample")}}
        build = partial(build_model, architecture_of(block, layers))
        model = load_model(build, weights, head="exact", strict=strict, **kwargs)
        return model.to(map_location).eval()


class Med3DResNetFeatures(resnet.Med3DResNetFeatures, Med3DResNet):
    __doc__ = resnet.Med3DResNetFeatures.__doc__


def build_model(arch: str, *, features_only: bool = False, out_indices=(1, 2, 3, 4), **kwargs: Any) -> nn.Module:
    """Build architecture `arch` with random weights; kwargs are the model's options."""
    unknown = set(kwargs) - set(MODEL_ARGS)
    if unknown:
        raise UsageError(
            f"unknown argument(s) {sorted(unknown)} for {arch}; accepted: {sorted({*MODEL_ARGS, *FEATURE_ARGS})}"
        )
    spec = ARCHITECTURES[arch]
    kwargs.setdefault("shortcut", spec["shortcut"])
    if features_only:
        return Med3DResNetFeatures(spec["block"], spec["layers"], out_indices=out_indices, **kwargs)
    return Med3DResNet(spec["block"], spec["layers"], **kwargs)


def build_from_config(config: Mapping, **overrides: Any) -> nn.Module:
    """A randomly initialised zoo model for a config (``features_only`` when it has ``out_indices``)."""
    arch, kwargs = config_model_kwargs(config)
    kwargs.update(overrides)
    return build_model(arch, **kwargs)
