"""`PretrainedCfg`: what a model's weights are, where they came from and the preprocessing they expect.

One dataclass that every way of loading weights fills: a manifest entry (`from_entry`), a local or
hf:// file (`weights.pretrained`), a folder or repo of `save_pretrained` files (`weights.model_files`),
a fine-tuning run (`weights.finetuned`); the one loader (`weights.loader.load_model`) fills the
load-time fields (`in_chans`, `weights_in_chans`, `head`).
Models carry it as a plain dict, `model.pretrained_cfg = cfg.to_dict()`, as timm's models do, so
`transforms_for(model)` and JSON output read it without importing this module.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import WeightsEntry

__all__ = ["PretrainedCfg", "has_weights"]


@dataclass
class PretrainedCfg:
    name: str  # "resnet50.3dseg8", or the architecture for weights outside the manifest
    architecture: str
    tag: str | None = None
    hf_hub_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    urls: list[str] = field(default_factory=list)
    sha256: str | None = None
    size: int | None = None
    format: str | None = None  # "medicalnet-pth" or "safetensors"
    license: str | None = None
    source: dict | None = None  # paper, datasets, training; `model_kwargs` of a published fine-tune
    preprocess: dict | None = None  # Preprocess.to_dict() of the recipe the weights expect
    shortcut: str | None = None
    weights_in_chans: int | None = None  # input channels the file's conv1 has
    in_chans: int | None = None  # input channels of the model (conv1 adapted when they differ)
    file: str | None = None  # the local file, when the weights came from one
    head: str | None = None  # None: no head; "pretrained": from the file; "new": freshly initialised
    class_names: list[str] | None = None  # the names of the head's classes, in index order, when the weights say

    @classmethod
    def from_entry(cls, entry: WeightsEntry) -> PretrainedCfg:
        """The cfg of a manifest entry (the load-time fields, file/in_chans/head, stay unset)."""
        return cls(
            name=entry.name, architecture=entry.model, tag=entry.tag, hf_hub_id=entry.hf_hub_id,
            revision=entry.revision, filename=entry.filename, urls=list(entry.urls), sha256=entry.sha256,
            size=entry.size, format=entry.format, license=entry.license, source=copy.deepcopy(entry.source),
            preprocess=copy.deepcopy(entry.preprocess), shortcut=entry.shortcut, weights_in_chans=entry.in_chans,
            class_names=_names(entry.source.get("class_names")),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (deep copies), the form models carry."""
        return asdict(self)


def _names(value: Any) -> list[str] | None:
    return [str(n) for n in value] if isinstance(value, (list, tuple)) and value else None


def has_weights(model: Any) -> bool:
    """Whether a model carries loaded weights: a random model's ``pretrained_cfg`` holds only timm's
    data keys (``data_cfg``), with no ``sha256`` of a weights file."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("sha256") is not None
