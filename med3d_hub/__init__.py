"""med3d-hub: the Med3D 3D ResNets (Chen, Ma, Zheng 2019) with verified pretrained weights.

    import med3d_hub
    model = med3d_hub.create_model("resnet50", num_classes=0)   # pooled embeddings
"""

from .io import read_volume
from .manifest import add_manifest, list_pretrained
from .preprocess import transforms_for
from .registry import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "add_manifest",
    "create_model",
    "extract_features",
    "list_models",
    "list_pretrained",
    "optimize_for_inference",
    "read_volume",
    "transforms_for",
    "__version__",
]

# Loaded on first use, so that `import med3d_hub` stays light.
_LAZY = {"extract_features": ".features", "optimize_for_inference": ".inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
