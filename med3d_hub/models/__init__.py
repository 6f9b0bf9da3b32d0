"""The model classes users hold (with save_pretrained / from_pretrained / push_to_hub), the architecture
table and the heads. The networks themselves are defined in med3d_hub.networks; nothing inside the
package imports this namespace."""

from ..networks.finetune_net import FinetuneNet
from ..networks.heads import SegmentationHead
from ..networks.resnet import ARCHITECTURES, DEFAULT_NUM_CLASSES, FeatureInfo
from ..weights.hub_model import Med3DResNet, Med3DResNetFeatures

__all__ = ["ARCHITECTURES", "DEFAULT_NUM_CLASSES", "FeatureInfo", "FinetuneNet", "Med3DResNet", "Med3DResNetFeatures", "SegmentationHead"]
