"""The one loader: weights that were found and read in, a zoo model holding them out.

Every way to a model with weights ends in `load_model`; the entry points only find the weights:

- ``create_model(name, pretrained=...)`` and timm's ``med3d_*`` names: ``weights.pretrained`` resolves
  the manifest entry, hf:// reference or local file;
- ``Med3DResNet.from_pretrained`` and timm's ``local-dir:`` / ``hf-hub:``: ``model_files`` resolves the
  saved folder or Hub repo;
- fine-tuned runs: ``finetuned`` resolves the run's encoder.

What this module does, the same for all of them: integer tensors (a quantised file) are refused,
weights in another float precision become float32 and NaN or infinity is refused; the shortcut type is the weights' (another one is an error);
``in_chans`` other than the weights' adapts conv1 (``checkpoints.adapt_in_chans``); every backbone
tensor must be in the weights with its shape, and nothing else (errors name the keys). The head
follows ``head``: ``"fit"`` initialises a head the weights lack (or have in another shape) afresh
and says so in the log, ``"exact"`` requires the weights' head to be the model's. ``strict=False``
loads what fits and keeps the rest as initialised. ``model.pretrained_cfg`` is the weights'
`PretrainedCfg`, with the load-time fields filled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UsageError
from ..networks.heads import SegmentationHead
from ..networks.resnet import init_weights
from . import checkpoints
from .checkpoints import HEAD_PREFIXES, CheckpointMismatchError
from .pretrained_cfg import PretrainedCfg

log = logging.getLogger(__name__)

__all__ = ["HEAD_ARGS", "ResolvedWeights", "build_without_init", "load_model", "over_saved_kwargs"]

HEAD_ARGS = ("num_classes", "seg_classes", "seg_upsample", "features_only", "out_indices")


@dataclass
class ResolvedWeights:
    """Weights an entry point found: the state dict under zoo key names, what they are, and where from."""

    state_dict: dict[str, torch.Tensor]
    cfg: PretrainedCfg  # provenance and preprocessing; load_model fills in_chans, weights_in_chans and head
    source: str  # what errors and logs call them: a manifest name, a path, an hf:// reference
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the settings they were saved or published with


def load_model(
    build: Callable[..., nn.Module],
    weights: ResolvedWeights,
    *,
    head: Literal["fit", "exact"] = "fit",
    strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """``build(**kwargs)`` with ``weights``; ``kwargs`` (the model's options) override the weights' own settings.

    ``build`` makes the network with random weights (``hub_model.build_model`` for an architecture);
    here it runs on the meta device, so no time goes into an initialisation the weights replace.

    A head argument (``num_classes``, ``seg_classes``, ``features_only``...) replaces the saved head as
    a whole, so ``num_classes=0`` gives the encoder of a published classifier.
    """
    checkpoints.check_floating(weights.state_dict, source=weights.source)
    state = _as_float32(weights.state_dict, weights.source)
    checkpoints.check_finite(state, source=weights.source)
    kwargs = over_saved_kwargs(weights.model_kwargs, kwargs)
    kwargs["shortcut"] = _shortcut(weights, state, kwargs.get("shortcut"))
    if strict:
        model = build_without_init(build, **kwargs)
        state = _adapt_in_chans(model, state, weights.source)
        head_state = _load_strict(model, state, weights.source, exact_head=head == "exact")
    else:
        model = build(**kwargs)
        state = _adapt_in_chans(model, state, weights.source)
        head_state = _load_fitting(model, state, weights.source)
    conv1 = weights.state_dict.get("conv1.weight")
    cfg = replace(
        weights.cfg,
        shortcut=kwargs["shortcut"],
        weights_in_chans=int(conv1.shape[1]) if conv1 is not None else weights.cfg.weights_in_chans,
        in_chans=model.in_chans,
        head=head_state,
        class_names=weights.cfg.class_names if head_state == "pretrained" else None,  # a new head's classes have no names
    ).to_dict()
    model.pretrained_cfg = {**model.data_cfg((cfg.get("preprocess") or {}).get("size")), **cfg}
    return model


def over_saved_kwargs(saved: dict, kwargs: dict) -> dict:
    """The caller's arguments over the saved ones; any head argument of the caller replaces the saved head."""
    if any(k in kwargs for k in HEAD_ARGS if k != "out_indices"):
        saved = {k: v for k, v in saved.items() if k not in HEAD_ARGS}
    return {**saved, **kwargs}


def _shortcut(weights: ResolvedWeights, state: dict[str, torch.Tensor], asked: str | None) -> str:
    shortcut = weights.cfg.shortcut or checkpoints.infer_shortcut(state)
    if asked is not None and asked != shortcut:
        raise UsageError(
            f"the weights {weights.source} were trained with shortcut {shortcut!r}, but shortcut={asked!r} was "
            "passed; drop the shortcut argument, or use pretrained=False"
        )
    return shortcut


def _as_float32(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Floating-point weights stored in another precision (float16, bfloat16, float64), as the float32 models use."""
    other = sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values() if v.is_floating_point() and v.dtype != torch.float32})
    if not other:
        return state_dict
    log.info("the weights of %s are stored as %s; converted to float32", source, ", ".join(other))
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def _adapt_in_chans(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """conv1 for the model's input channels, when the weights were trained on others (the 3D rule of ``checkpoints``)."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.shape[1] == model.in_chans:
        return state
    log.info("adapting conv1 of %s from %d to %d input channels", source, conv1.shape[1], model.in_chans)
    return {**state, "conv1.weight": checkpoints.adapt_in_chans(conv1, model.in_chans)}


# -- strict loading, without a wasted random initialisation -------------------------------------------

_RANDOM_INITS = {
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    nn.init.normal_,
    nn.init.uniform_,
    nn.init.kaiming_uniform_,
}


class _SkipRandomInitOnMeta(TorchFunctionMode):
    """Turn random initialisation of meta tensors into a no-op.

    On the meta device the values are never used, but PyTorch still routes ``normal_``/``uniform_``
    through a path that imports torch._dynamo (about a second, once per process).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_INITS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_without_init(build: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``build(*args, **kwargs)`` on the meta device: no memory and no random init for tensors the weights replace."""
    with torch.device("meta"), _SkipRandomInitOnMeta():
        return build(*args, **kwargs)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, exact_head: bool) -> str | None:
    """Load into the meta-built model; returns the head's state: "pretrained", "new" or None (no head)."""
    backbone, head = checkpoints.split_head(state)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model_head = {k: v for k, v in shapes.items() if k.startswith(HEAD_PREFIXES)}
    checkpoints.check_backbone({k: v for k, v in shapes.items() if k not in model_head}, backbone, source=source)
    fits = set(head) == set(model_head) and all(tuple(head[k].shape) == model_head[k] for k in head)
    if exact_head and not fits and (model_head or not getattr(model, "out_indices", None)):
        raise CheckpointMismatchError(
            f"the head in {source} ({checkpoints.describe_head(state)}) differs from the model's ({checkpoints.describe_head(shapes)}); build the model "
            "with the head of the file (num_classes=..., seg_classes=...), or load with strict=False to keep a fresh head"
        )
    head_state = None
    if model_head and fits:
        backbone.update(head)
        head_state = "pretrained"
    elif model_head:
        head_state = "new"
        what = "carry no head" if not head else f"carry another head ({', '.join(sorted(head)[:4])}...)"
        log.info("the weights of %s %s: the model's head (%s) is freshly initialised", source, what, _head_name(model))
    elif head:
        log.info("the model has no head: %d head tensors of %s are not used", len(head), source)
    model.load_state_dict(backbone, strict=False, assign=True)
    if head_state == "new":
        _init_new_head(model)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: these tensors were neither loaded nor initialised: {', '.join(left)}")
    return head_state


def _head_name(model: nn.Module) -> str:
    if getattr(model, "seg_classes", None) is not None:
        return f"conv_seg, {model.seg_classes} classes"
    return f"fc, {model.num_classes} classes"


def _init_new_head(model: nn.Module) -> None:
    """A real, freshly initialised head, exactly as a randomly built model would have it."""
    if getattr(model, "seg_classes", None) is not None:
        head = SegmentationHead(model.num_features, model.seg_classes)
        init_weights(head)
        model.conv_seg = head
    if getattr(model, "num_classes", 0) > 0:
        model.reset_classifier(model.num_classes)


def _load_fitting(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> str | None:
    """``strict=False``: load every tensor whose key and shape fit, keep the rest as initialised, and log both."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fitting = {k: v for k, v in state.items() if shapes.get(k) == tuple(v.shape)}
    model.load_state_dict(fitting, strict=False)
    kept, ignored = sorted(set(shapes) - set(fitting)), sorted(set(state) - set(fitting))
    if kept or ignored:
        log.warning("loaded %s with strict=False: %d tensors of the model kept as initialised (%s), %d tensors of "
                    "the file ignored (%s)", source, len(kept), ", ".join(kept[:4]), len(ignored), ", ".join(ignored[:4]))
    model_head = [k for k in shapes if k.startswith(HEAD_PREFIXES)]
    if not model_head:
        return None
    return "pretrained" if all(k in fitting for k in model_head) else "new"
