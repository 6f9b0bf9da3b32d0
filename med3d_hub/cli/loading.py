"""The model a command runs: ``--model``/``--pretrained`` turned into a loaded backbone and its preprocessing."""

from __future__ import annotations

import argparse
from typing import Any

from ..weights.pretrained_cfg import has_weights
from .output import warn


def load_model(args: argparse.Namespace, **kwargs: Any):
    """The model of ``--model``/``--pretrained`` (backbone only) and a label for its weights."""
    from ..weights.factory import create_model, resolve_pretrained

    name, pretrained = resolve_pretrained(args.model, args.pretrained)
    if pretrained is False:
        import torch

        warn(f"--pretrained {args.pretrained}: {name} has RANDOM weights (--seed {args.seed}); "
             "its features carry no learned meaning")
        with torch.random.fork_rng(devices=[]):  # reproducible weights, and the caller's RNG left as it was
            torch.manual_seed(args.seed)
            model = create_model(name, pretrained=False, num_classes=0, **kwargs)
        return model, weights_label(model, name, pretrained) + f", seed {args.seed}"
    model = create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    return model, weights_label(model, name, pretrained)


def model_preprocess(model, name: str, overrides: dict):
    """The weights' preprocessing with the user's overrides.

    A model with random weights has no preprocessing of its own; it gets the recipe of its
    architecture's default weights, so that ``--pretrained none`` is a dry run of the default path.
    """
    from ..data.preprocess import transforms_for

    base = model
    if not has_weights(model):
        from ..networks.registry import split_name
        from ..weights.manifest import default_entry

        try:
            base = default_entry(split_name(name)[0]).preprocess
        except ValueError:  # no default weights for this depth: the paper's recipe
            base = None
    return transforms_for(base, **overrides)


def weights_label(model, name: str, pretrained: bool | str) -> str:
    """A short description of the weights a model carries, from its ``pretrained_cfg``."""
    if pretrained is False:
        return "random weights (no pretraining)"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    label = cfg.get("name") or name
    if cfg.get("file"):
        where = cfg["file"]
    elif cfg.get("hf_hub_id"):
        where = f"hf://{cfg['hf_hub_id']}@{cfg.get('revision') or 'main'}/{cfg.get('filename')}"
    else:
        where = pretrained if isinstance(pretrained, str) else ""
    sha = cfg.get("sha256")
    extra = ", ".join(x for x in (str(where), f"sha256 {sha[:12]}" if sha else "") if x)
    return f"{label} ({extra})" if extra else str(label)
