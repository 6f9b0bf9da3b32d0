"""med3d-hub: the Med3D 3D ResNets (Chen, Ma, Zheng 2019) with verified pretrained weights.

    import med3d_hub
    model = med3d_hub.create_model("resnet50", num_classes=0)   # pooled embeddings
"""

from .registry import create_model, list_models

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "__version__"]
