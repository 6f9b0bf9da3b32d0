"""Any model the package knows, as the deploy exports (ONNX, MONAI bundle) take it.

    deployable = load_deployable("resnet10.3dseg8")        # name.tag, a run or model folder, or a model

A source is read by the code that already reads it, never a second way:

- a co-training run folder: ``publishing/run.py:read_run`` (the encoder);
- a model folder (``config.json`` + ``model.safetensors``, any head): ``read_run`` too;
- a fine-tuning run folder (``finetuned.safetensors``): ``inference/predictor.py:load_predictor``,
  the network ``med3d predict`` applies (encoder + decoder or classifier);
- ``name.tag`` or a weights file with ``model=``: ``weights/factory.py`` (``resolve_pretrained``,
  ``create_model``); weights published with their head keep it, the others are encoders;
- a model object.

What comes back is the network with the encoder inside it, the preprocessing the weights expect,
the class names of the head and the sha256 of the weights file, so that an export can say exactly
what it holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from torch import nn

from ..data.preprocess import Preprocess, transforms_for
from ..errors import MissingFileError, UsageError
from ..networks.finetune_net import FinetuneNet
from ..networks.resnet import Med3DResNet

__all__ = ["RETURNS", "Deployable", "load_deployable"]

# What an exported network returns: the pooled embedding (``med3d features``), the layer4 map, or
# the head's logits (classes, or a segmentation map at the input's size).
RETURNS = ("embedding", "layer4", "logits")


@dataclass
class Deployable:
    """A network ready to export, with what its users need to feed it and read its outputs."""

    net: nn.Module  # the whole network, eval mode, on the CPU
    encoder: Med3DResNet  # the backbone inside ``net`` (``net`` itself for a zoo model)
    task: str | None  # "seg", "cls", or None for an encoder
    class_names: list[str]
    preprocess: Preprocess
    architecture: str  # resnet10 ... resnet200
    source: str
    weights_sha256: str | None  # of the file the weights were read from
    license: str | None = None  # of the weights, when the source says

    def module(self, returns: str) -> nn.Module:
        """``net`` reduced to the one output ``returns`` names (see ``RETURNS``)."""
        if returns not in RETURNS:
            raise UsageError(f"returns={returns!r}: choose one of {', '.join(RETURNS)}")
        if returns == "logits" and self.task is None:
            raise UsageError(f"{self.source} is an encoder (no head), so it has no logits; "
                             "export its embedding or its layer4 map")
        return Returns(self.net, self.encoder, returns).eval()

    @property
    def default_returns(self) -> str:
        return "logits" if self.task else "embedding"


class Returns(nn.Module):
    """One output of a network, with one input named ``image`` (N, C, D, H, W)."""

    def __init__(self, net: nn.Module, encoder: Med3DResNet, returns: str):
        super().__init__()
        self.net = net
        self.encoder = encoder
        self.returns = returns

    def forward(self, image):
        if self.returns == "logits":
            return self.net(image)
        features = self.encoder.forward_features(image)
        return features if self.returns == "layer4" else self.encoder.forward_head(features, pre_logits=True)


Source = Union[str, os.PathLike, nn.Module]


def load_deployable(source: Source, *, model: str | None = None, checkpoint: str | None = None,
                    preprocess: Preprocess | dict | None = None) -> Deployable:
    """The network of ``source`` (see the module docstring); ``preprocess`` replaces the source's."""
    from ..weights import finetuned

    if isinstance(source, nn.Module):
        found = _from_module(source.eval().cpu(), "the given model", None)
    else:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir() and finetuned.is_finetune_run(path):
            found = _from_predictor(path)
        elif path.is_dir():
            found = _from_run(path, checkpoint)
        elif not path.exists() and model is None and ("/" in text or os.sep in text):
            raise MissingFileError(f"{text}: no such file or folder; give name.tag, a run or model folder, "
                                   "a fine-tuning run folder, or a weights file with --model")
        else:
            found = _from_weights(text, model)
    if preprocess is not None:
        found.preprocess = transforms_for(preprocess)
    return found


def _from_predictor(path: Path) -> Deployable:
    from ..inference.predictor import load_predictor

    predictor = load_predictor(path)
    return _from_module(predictor.net, str(path), predictor.preprocess, predictor.class_names)


def _from_run(path: Path, checkpoint: str | None) -> Deployable:
    from ..files import sha256_file
    from .run import read_run

    run = read_run(path, checkpoint=checkpoint)
    found = _from_module(run.model, str(path), transforms_for(run.preprocess), run.config.get("class_names"))
    found.license = found.license or run.license
    if found.weights_sha256 is None and Path(run.weights_source).is_file():
        found.weights_sha256 = sha256_file(run.weights_source)
    return found


def _from_weights(text: str, model: str | None) -> Deployable:
    from ..weights.factory import create_model, resolve_pretrained

    name, pretrained = resolve_pretrained(model or text, text if model else None)
    if pretrained is False:
        raise UsageError(f"{text}: random weights have nothing to deploy; give weights by name.tag, a file or a folder")
    net = create_model(name, pretrained=pretrained)
    if (net.pretrained_cfg or {}).get("head") != "pretrained":  # weights without a head: an encoder
        net.reset_classifier(0)
    return _from_module(net.eval(), text, None)


def _from_module(net: nn.Module, source: str, preprocess: Preprocess | None, class_names=None) -> Deployable:
    """An encoder as it is; a network with a head through ``load_predictor`` (its task, class names, preprocessing)."""
    from ..inference.predictor import load_predictor
    from ..weights.model_files import architecture_of

    encoder = net.encoder if isinstance(net, FinetuneNet) else net
    if not isinstance(encoder, Med3DResNet):
        raise UsageError(f"{source}: expected a Med3D ResNet or a fine-tuning network, got {type(net).__name__}")
    cfg = encoder.pretrained_cfg if isinstance(encoder.pretrained_cfg, dict) else {}
    task, names = None, []
    head = isinstance(net, FinetuneNet) or encoder.seg_classes or encoder.num_classes
    if head and cfg.get("head") != "new":  # a freshly initialised head has no logits worth exporting
        predictor = load_predictor(net, preprocess=preprocess, class_names=class_names)
        task, names, preprocess = predictor.task, predictor.class_names, predictor.preprocess
    return Deployable(
        net=net.eval(), encoder=encoder, task=task, class_names=names,
        preprocess=preprocess if preprocess is not None else transforms_for(encoder),
        architecture=architecture_of(encoder.block, encoder.layers), source=source,
        weights_sha256=cfg.get("sha256"), license=cfg.get("license"),
    )
