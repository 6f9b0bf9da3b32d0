"""The model a command runs: ``--model``/``--pretrained``/``--convention`` turned into a loaded backbone and its
preprocessing."""

from __future__ import annotations

import argparse
from typing import Any

from ..weights.pretrained_cfg import has_weights
from .options import preprocess_overrides
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


def apply_convention(args: argparse.Namespace, default_model: str) -> None:
    """``--convention``: its model and weights fill ``--model``/``--pretrained`` where the user left them out.

    A ``--model`` of another architecture is refused; ``--pretrained`` (a local copy of the weights,
    or ``none``) and the preprocessing overrides are kept, with a warning that the number is then not
    the published convention's.
    """
    from ..inference.conventions import DEFAULT_CONVENTION, get_convention

    conv = get_convention(getattr(args, "convention", None) or DEFAULT_CONVENTION)
    if args.model is not None:
        conv.check_model(args.model)
    if conv.model is None:
        args.model = args.model or default_model
    else:
        args.model = args.model or conv.model
        if args.pretrained is None and "." not in args.model:
            args.pretrained = conv.pretrained
    changed = [o for o, v in (("--pretrained", args.pretrained not in (None, conv.pretrained)),
                              ("preprocessing overrides", bool(preprocess_overrides(args)))) if v]
    if conv.model is not None and changed:
        warn(f"--convention {conv.name} with {' and '.join(changed)}: the fingerprint says what was computed; "
             f"it is not the published {conv.name} number")
    args.convention = conv.name


def command_preprocess(model, args: argparse.Namespace):
    """The preprocessing of a command: the convention's, or the weights' (``model_preprocess``), with the overrides."""
    from ..inference.conventions import get_convention

    conv = get_convention(args.convention)
    overrides = preprocess_overrides(args)
    if conv.preprocess is None:
        return model_preprocess(model, args.model, overrides)
    base = conv.preprocess_for(model)
    return base.replace(**overrides) if overrides else base


def preprocess_of(args: argparse.Namespace):
    """The preprocessing a command would use, read from the table or the manifest where that says it.

    Weights from a file or an ``hf://`` address carry their own recipe, so only those are loaded.
    """
    from ..inference.conventions import get_convention
    from ..weights.factory import resolve_pretrained

    name, pretrained = resolve_pretrained(args.model, args.pretrained)
    if get_convention(args.convention).preprocess is None and isinstance(pretrained, str):
        return command_preprocess(load_model(args)[0], args)
    if get_convention(args.convention).preprocess is None and pretrained is True:
        from ..data.preprocess import transforms_for
        from ..networks.registry import split_name
        from ..weights.manifest import find_entry

        overrides = preprocess_overrides(args)
        return transforms_for(find_entry(*split_name(name)).preprocess, **overrides)
    return command_preprocess(None, args)
