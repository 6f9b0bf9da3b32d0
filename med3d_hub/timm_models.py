"""The Med3D ResNets in timm's registry, as ``med3d_resnet{depth}[.tag]``.

    import med3d_hub  # registers the models with timm, whether timm is imported before or after
    import timm
    model = timm.create_model("med3d_resnet50.3dseg8", pretrained=True, num_classes=2)
    timm.list_pretrained("med3d_*")

The registered functions build through ``med3d_hub.create_model``: weights come from our manifest,
are verified and loaded strictly, and ``in_chans`` uses our 3D first-conv rule. timm's own weight
loading and its 2D input-conv adaptation are never used. The tags timm lists are those of the
manifests known at import; a tag added later (MED3D_HUB_MANIFEST, add_manifest) still loads when named.

A folder of ``model.save_pretrained`` / ``med3d export`` (or a Hub repo of ``med3d publish``) is a timm
model too: its config.json names ``med3d_resnet{depth}``, so ``timm.create_model("local-dir:<folder>",
pretrained=True)`` (timm 1.0.16 and later) and ``"hf-hub:<org>/<repo>"`` rebuild the saved network,
head and settings included, and load its weights.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from .networks.registry import TIMM_PREFIX
from .networks.resnet import ARCHITECTURES, timm_data_cfg
from .weights.factory import create_model, create_saved_model
from .weights.manifest import load_entries
from .weights.pretrained_cfg import PretrainedCfg

__all__: list[str] = []  # timm's register_model appends each model name
PREFIX = TIMM_PREFIX


def _timm_cfg(entry) -> dict:
    """What timm's registry records for a set of weights (informational: our loader does the loading)."""
    cfg = PretrainedCfg.from_entry(entry)
    return {
        **timm_data_cfg(entry.in_chans, (cfg.preprocess or {}).get("size")),
        "hf_hub_id": cfg.hf_hub_id,
        "hf_hub_filename": cfg.filename,
        "url": cfg.urls[0] if not cfg.hf_hub_id and cfg.urls else None,
        "license": cfg.license,
        "description": entry.description,
        "paper_ids": "arXiv:1904.00625",
        "origin_url": (cfg.source or {}).get("code"),
    }


def _tag(pretrained_cfg: Any) -> str | None:
    """The weights tag timm hands over: the part after the dot of the name, or a cfg carrying a tag."""
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg or None
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag")
    return getattr(pretrained_cfg, "tag", None)


def _saved_model(pretrained_cfg: Any) -> str | None:
    """The folder (timm's ``local-dir:``) or Hub repo (``hf-hub:``) of a saved model, when timm read its config.json."""
    if not isinstance(pretrained_cfg, dict) or "block" not in pretrained_cfg:
        return None
    source = pretrained_cfg.get("source")
    return pretrained_cfg.get("file") if source == "local-dir" else pretrained_cfg.get("hf_hub_id") if source == "hf-hub" else None


def _entrypoint(arch: str):
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None, **kwargs: Any):
        kwargs.pop("pretrained_strict", None)  # loading is always strict here
        kwargs.pop("pretrained_model_args", None)  # timm's copy of arguments it already passed
        cache_dir = kwargs.pop("cache_dir", None)  # timm always passes it; it matters only with weights
        if pretrained and cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
        saved = _saved_model(pretrained_cfg)
        if saved is not None:  # timm read a saved model's config.json: that network, with its weights
            return create_saved_model(saved, pretrained=pretrained, **kwargs)
        tag = _tag(pretrained_cfg)
        # pretrained_cfg_overlay=dict(file=...): these weights instead of the manifest's
        file = (pretrained_cfg_overlay or {}).get("file")
        name = f"{arch}.{tag}" if tag else arch
        return create_model(name, pretrained=file if pretrained and file else pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = PREFIX + arch
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"Med3D {arch} through med3d_hub.create_model (see med3d_hub.timm_models)."
    return entrypoint


default_cfgs = generate_default_cfgs(
    {f"{PREFIX}{e.model}.{e.tag}{'*' if e.default else ''}": _timm_cfg(e) for e in load_entries()}
)

for _arch in ARCHITECTURES:
    globals()[PREFIX + _arch] = register_model(_entrypoint(_arch))
