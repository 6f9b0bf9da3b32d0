"""torch.hub entrypoints for the Med3D ResNets.

    model = torch.hub.load("med3d-hub/med3d-hub", "resnet50", pretrained=True)
    model = torch.hub.load("med3d-hub/med3d-hub", "create_model", "resnet50.23datasets", pretrained=True)

Each entrypoint takes the arguments of ``med3d_hub.create_model``. Nothing of the package is
imported until an entrypoint is called, so ``torch.hub.list`` stays fast.
"""

dependencies = ["torch", "huggingface_hub", "safetensors", "requests"]


def _create(name, pretrained, kwargs):
    from med3d_hub import create_model as create

    return create(name, pretrained=pretrained, **kwargs)


def create_model(name, pretrained=False, **kwargs):
    """Any Med3D model by name, with an optional weights tag: "resnet50", "resnet50.23datasets".

    pretrained: False (random), True (the tag's weights, or the depth's default 3DSeg-8 weights), a
    local file path, or "hf://org/repo@revision/file". kwargs: num_classes, seg_classes, in_chans,
    features_only, out_indices, ... (see med3d_hub.create_model).
    """
    return _create(name, pretrained, kwargs)


def resnet10(pretrained=False, **kwargs):
    """Med3D ResNet-10 (basic blocks 1-1-1-1, shortcut B, 14.4 M backbone parameters).

    pretrained=True loads MedicalNet's 3DSeg-8 weights (resnet10.3dseg8); for the 23-dataset
    release use create_model("resnet10.23datasets", pretrained=True). kwargs: see create_model.
    """
    return _create("resnet10", pretrained, kwargs)


def resnet18(pretrained=False, **kwargs):
    """Med3D ResNet-18 (basic blocks 2-2-2-2, shortcut A, 33.0 M backbone parameters).

    pretrained=True loads MedicalNet's 3DSeg-8 weights (resnet18.3dseg8); also available:
    resnet18.23datasets via create_model. kwargs: see create_model.
    """
    return _create("resnet18", pretrained, kwargs)


def resnet34(pretrained=False, **kwargs):
    """Med3D ResNet-34 (basic blocks 3-4-6-3, shortcut A, 63.3 M backbone parameters).

    pretrained=True loads MedicalNet's 3DSeg-8 weights (resnet34.3dseg8); also available:
    resnet34.23datasets via create_model. kwargs: see create_model.
    """
    return _create("resnet34", pretrained, kwargs)


def resnet50(pretrained=False, **kwargs):
    """Med3D ResNet-50 (bottleneck blocks 3-4-6-3, shortcut B, 46.2 M backbone parameters).

    pretrained=True loads MedicalNet's 3DSeg-8 weights (resnet50.3dseg8); also available:
    resnet50.23datasets via create_model. kwargs: see create_model.
    """
    return _create("resnet50", pretrained, kwargs)


def resnet101(pretrained=False, **kwargs):
    """Med3D ResNet-101 (bottleneck blocks 3-4-23-3, shortcut B, 85.3 M backbone parameters).

    pretrained=True loads MedicalNet's 3DSeg-8 weights (resnet101.3dseg8). kwargs: see create_model.
    """
    return _create("resnet101", pretrained, kwargs)


def resnet152(pretrained=False, **kwargs):
    """Med3D ResNet-152 (bottleneck blocks 3-8-36-3, shortcut B, 117.5 M backbone parameters).

    pretrained=True loads MedicalNet's 3DSeg-8 weights (resnet152.3dseg8). kwargs: see create_model.
    """
    return _create("resnet152", pretrained, kwargs)


def resnet200(pretrained=False, **kwargs):
    """Med3D ResNet-200 (bottleneck blocks 3-24-36-3, shortcut B, 126.7 M backbone parameters).

    pretrained=True loads MedicalNet's 3DSeg-8 weights (resnet200.3dseg8). kwargs: see create_model.
    """
    return _create("resnet200", pretrained, kwargs)
