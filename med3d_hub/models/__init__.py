"""Network definitions only: no files, no Hub."""

from .heads import SegmentationHead
from .resnet import ARCHITECTURES, DEFAULT_NUM_CLASSES, FeatureInfo, Med3DResNet, Med3DResNetFeatures

__all__ = ["ARCHITECTURES", "DEFAULT_NUM_CLASSES", "FeatureInfo", "Med3DResNet", "Med3DResNetFeatures", "SegmentationHead"]
