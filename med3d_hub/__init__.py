"""med3d-hub: the Med3D 3D ResNets (Chen, Ma, Zheng 2019) with verified pretrained weights.

    import med3d_hub
    model = med3d_hub.create_model("resnet50", num_classes=0)   # pooled embeddings
"""

import sys

from .data.io import read_volume
from .data.preprocess import transforms_for
from .networks.registry import list_models
from .weights.factory import create_model
from .weights.manifest import add_manifest, list_pretrained

__version__ = "0.1.0"

__all__ = [
    "add_manifest",
    "create_model",
    "export_onnx",
    "extract_features",
    "list_models",
    "list_pretrained",
    "optimize_for_inference",
    "predict",
    "read_volume",
    "transforms_for",
    "__version__",
]

# Loaded on first use, so that `import med3d_hub` stays light.
_LAZY = {"export_onnx": ".publishing.onnx_export", "extract_features": ".inference.features",
         "optimize_for_inference": ".inference.optimize", "predict": ".inference.predict"}
# Public namespaces: the model classes (med3d_hub.models.Med3DResNet) and the feature-set metrics
# (`from med3d_hub import metrics`: FID, KID, MMD), which live in the inference layer.
_SUBMODULES = {"models": ".models", "metrics": ".inference.metrics"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(_SUBMODULES[name], __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with_timm() -> None:
    """Make the ``med3d_`` models known to timm in any process that imports both, in either order.

    timm takes about a second to import, so it is not imported here: when it is already loaded the
    models are registered now, otherwise right after ``import timm`` finishes.
    """
    if "timm" in sys.modules:
        _import_timm_models()
    else:
        sys.meta_path.insert(0, _RegisterAfterTimm())


def _import_timm_models() -> None:
    import importlib
    import logging

    try:
        importlib.import_module(".timm_models", __name__)
    except Exception as error:  # never break `import timm`; say how to see the cause
        logging.getLogger(__name__).warning(
            "the med3d_ models were not registered with timm (%s); `import med3d_hub.timm_models` shows why", error
        )


class _RegisterAfterTimm:
    """A one-shot import hook: lets timm import as usual, then registers the models."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister:
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # resources and the like: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _import_timm_models()


_register_with_timm()
