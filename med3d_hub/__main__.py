"""`python -m med3d_hub`: build a Med3D ResNet-10 and extract features of a default volume."""

import time

import torch

from . import create_model


def main() -> int:
    d, h, w = 56, 112, 112
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, n) for n in (d, h, w)), indexing="ij"))
    phantom = ((grid**2).sum(0) < 0.6).float()[None, None]  # an ellipsoid "organ" in an empty volume
    model = create_model("resnet10", num_classes=0).eval()
    start = time.perf_counter()
    with torch.no_grad():
        feature_map = model.forward_features(phantom)
        embedding = model.forward_head(feature_map)
    print(f"resnet10 on a {d}x{h}x{w} phantom: layer4 map {tuple(feature_map.shape)}, "
          f"embedding {tuple(embedding.shape)} in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
