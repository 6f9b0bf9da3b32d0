"""The published ways of computing a 3D FID on Med3D/MedicalNet features, read from one table.

Numbers from different conventions are not comparable: the weights, the intensity scaling, the
resizing and the estimator all move the FID. ``fid_conventions.json`` (shipped beside this module)
holds each one as data; this module only reads it and turns an entry into the model name, the
``Preprocess`` and the estimator the rest of the package already understands.

    conv = get_convention("ha-gan")
    model = create_model(conv.model_name(), pretrained=True, num_classes=0)
    features = extract_features(model, scans, convention="ha-gan")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..data.preprocess import Preprocess, transforms_for
from ..errors import UsageError

__all__ = ["DEFAULT_CONVENTION", "Convention", "get_convention", "list_conventions"]

TABLE = Path(__file__).with_name("fid_conventions.json")
DEFAULT_CONVENTION = "med3d"
LAYERS = ("layer4",)  # what the feature path computes; the table may name only these
POOLINGS = ("avg",)
ESTIMATORS = ("eigen", "sqrtm")


@dataclass(frozen=True)
class Convention:
    """One row of the table: where it comes from and everything that changes its number."""

    name: str
    title: str
    source: str
    model: str | None  # None: the user's --model
    pretrained: str | None  # a weights tag of the model, or None for its default weights
    weights: str
    preprocess: dict | None  # None: the weights' own
    layer: str
    pooling: str
    estimator: str
    computes: str
    choices: str

    def model_name(self, default: str | None = None) -> str:
        """``resnet50.3dseg8``: the zoo name of the convention's weights (``default`` when it names none)."""
        if self.model is None:
            if default is None:
                raise UsageError(f"the {self.name} convention uses the model you choose: give one")
            return default
        return f"{self.model}.{self.pretrained}" if self.pretrained else self.model

    def check_model(self, model_name: str) -> None:
        """Refuse a model of another architecture than the convention's."""
        if self.model is not None and model_name.partition(".")[0] != self.model:
            raise UsageError(f"the {self.name} convention uses {self.model} ({self.weights}); "
                             f"got {model_name}: leave --model out")

    def preprocess_for(self, model: Any = None) -> Preprocess:
        """The convention's preprocessing, or the weights' own (``transforms_for(model)``) where it has none.

        A network of another architecture than the convention's is refused.
        """
        if self.model is not None and hasattr(model, "block") and hasattr(model, "layers"):
            from ..networks.registry import architecture_of

            self.check_model(architecture_of(model.block, model.layers) or type(model).__name__)
        return transforms_for(model) if self.preprocess is None else Preprocess.from_dict(self.preprocess)


def _convention(name: str, row: dict) -> Convention:
    try:
        conv = Convention(name=name, **row)
    except TypeError as err:
        raise UsageError(f"{TABLE}: the convention {name!r} is malformed ({err})") from None
    for value, allowed, what in ((conv.layer, LAYERS, "layer"), (conv.pooling, POOLINGS, "pooling"),
                                 (conv.estimator, ESTIMATORS, "estimator")):
        if value not in allowed:
            raise UsageError(f"{TABLE}: convention {name!r} has {what} {value!r}; supported: {', '.join(allowed)}")
    if conv.preprocess is not None:
        Preprocess.from_dict(conv.preprocess)  # validated when the table is read, not at the first scan
    return conv


@lru_cache(maxsize=1)
def _table() -> dict[str, Convention]:
    rows = json.loads(TABLE.read_text(encoding="utf-8"))["conventions"]
    return {name: _convention(name, row) for name, row in rows.items()}


def list_conventions() -> list[Convention]:
    """Every convention, in the table's order."""
    return list(_table().values())


def get_convention(name: str | Convention) -> Convention:
    """A convention by name; an unknown name lists the known ones."""
    if isinstance(name, Convention):
        return name
    table = _table()
    if name not in table:
        raise UsageError(f"unknown FID convention {name!r}; known: {', '.join(table)} "
                         "(med3d fid --list-conventions)")
    return table[name]
