"""The model zoo against the published Med3D architecture (REFERENCE.md section 1).

`reference_forward` below is an independent, functional re-statement of the architecture: it
reads weights by MedicalNet's key names from a plain state dict and calls torch.nn.functional
directly, sharing no code with `med3d_hub.models`.
"""

import pytest
import torch
import torch.nn.functional as F

import med3d_hub
from med3d_hub.models import ARCHITECTURES

torch.set_num_threads(2)

DEPTHS = [10, 18, 34, 50, 101, 152, 200]
TRAINABLE = dict(zip(DEPTHS, [14_355_520, 32_986_176, 63_295_808, 46_155_072, 85_201_216, 117_359_936, 126_559_552]))
# Backbone parameters including BN running statistics, in millions (REFERENCE.md).
WITH_STATS_M = dict(zip(DEPTHS, [14.36, 32.99, 63.31, 46.21, 85.31, 117.51, 126.74]))
SPEC = {  # depth -> (bottleneck?, blocks per stage, shortcut of the released weights)
    10: (False, (1, 1, 1, 1), "B"),
    18: (False, (2, 2, 2, 2), "A"),
    34: (False, (3, 4, 6, 3), "A"),
    50: (True, (3, 4, 6, 3), "B"),
    101: (True, (3, 4, 23, 3), "B"),
    152: (True, (3, 8, 36, 3), "B"),
    200: (True, (3, 24, 36, 3), "B"),
}


# ---------------------------------------------------------------------------------------------
# Independent reference: the architecture as written in the paper's released code, functional.
def _bn(sd, prefix, x):
    return F.batch_norm(
        x, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"], sd[prefix + ".bias"],
        training=False, eps=1e-5,
    )


def _conv(sd, key, x, stride=1, padding=0, dilation=1):
    return F.conv3d(x, sd[key], None, stride, padding, dilation)


def reference_forward(sd, depth, x, shortcut=None, dilated=True):
    """Layer4 map of a Med3D ResNet of `depth`, from state dict `sd` (MedicalNet key names)."""
    bottleneck, blocks, default_shortcut = SPEC[depth]
    shortcut = shortcut or default_shortcut
    expansion = 4 if bottleneck else 1
    x = F.relu(_bn(sd, "bn1", _conv(sd, "conv1.weight", x, stride=2, padding=3)))
    x = F.max_pool3d(x, 3, 2, 1)
    in_planes = 64
    strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if dilated else ((1, 2, 2, 2), (1, 1, 1, 1))
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for b in range(n):
            p = f"layer{s + 1}.{b}."
            stride = strides[s] if b == 0 else 1
            d = dilations[s]
            if bottleneck:
                out = F.relu(_bn(sd, p + "bn1", _conv(sd, p + "conv1.weight", x)))
                out = F.relu(_bn(sd, p + "bn2", _conv(sd, p + "conv2.weight", out, stride, d, d)))
                out = _bn(sd, p + "bn3", _conv(sd, p + "conv3.weight", out))
            else:
                out = F.relu(_bn(sd, p + "bn1", _conv(sd, p + "conv1.weight", x, stride, d, d)))
                out = _bn(sd, p + "bn2", _conv(sd, p + "conv2.weight", out, 1, d, d))
            if b == 0 and (stride != 1 or in_planes != planes * expansion):
                if shortcut == "A":  # upstream: avg_pool3d(kernel 1, stride), then zero channels
                    res = F.avg_pool3d(x, kernel_size=1, stride=stride)
                    zeros = res.new_zeros(res.shape[0], planes * expansion - res.shape[1], *res.shape[2:])
                    res = torch.cat([res, zeros], dim=1)
                else:
                    res = _bn(sd, p + "downsample.1", _conv(sd, p + "downsample.0.weight", x, stride))
            else:
                res = x
            x = F.relu(out + res)
        in_planes = planes * expansion
    return x


def expected_keys(depth, shortcut=None):
    """MedicalNet backbone keys (without `module.`), derived from the architecture description."""
    bottleneck, blocks, default_shortcut = SPEC[depth]
    shortcut = shortcut or default_shortcut
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    expansion = 4 if bottleneck else 1
    in_planes = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for b in range(n):
            p = f"layer{s + 1}.{b}."
            convs = 3 if bottleneck else 2
            for c in range(1, convs + 1):
                keys += [p + f"conv{c}.weight"] + [p + f"bn{c}.{k}" for k in bn]
            needs_down = b == 0 and (s > 0 or in_planes != planes * expansion)
            if needs_down and shortcut == "B":
                keys += [p + "downsample.0.weight"] + [p + f"downsample.1.{k}" for k in bn]
        in_planes = planes * expansion
    return set(keys)


def randomize_bn(model, seed=0):
    """Non-trivial BN statistics, so that eval-mode forwards exercise every BN parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
def test_list_models_and_patterns():
    assert med3d_hub.list_models() == [f"resnet{d}" for d in DEPTHS]
    assert med3d_hub.list_models("resnet1*") == ["resnet10", "resnet18", "resnet101", "resnet152"]
    assert med3d_hub.list_models("vit*") == []


@pytest.mark.parametrize("depth", DEPTHS)
def test_keys_and_parameter_counts(depth):
    model = med3d_hub.create_model(f"resnet{depth}", num_classes=0)
    sd = model.state_dict()
    assert set(sd) == expected_keys(depth)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TRAINABLE[depth]
    assert round(sum(v.numel() for v in sd.values()) / 1e6, 2) == WITH_STATS_M[depth]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    features = med3d_hub.create_model(f"resnet{depth}", features_only=True, out_indices=(1, 2))
    assert set(features.state_dict()) == set(sd)
    # A backbone state dict loads strictly into every variant; heads add keys, never rename.
    for kwargs in ({}, {"num_classes": 5}, {"seg_classes": 3}):
        variant = med3d_hub.create_model(f"resnet{depth}", **kwargs)
        missing, unexpected = variant.load_state_dict(sd, strict=False)
        assert not unexpected and all(k.startswith(("fc.", "conv_seg.")) for k in missing)


# Small deep nets stay quick; the deepest are exercised on one shape each.
FORWARD_CASES = [(d, shape) for d in (10, 18, 34, 50) for shape in [(2, 1, 23, 37, 41), (1, 1, 16, 16, 16)]] + [
    (101, (1, 1, 17, 19, 21)), (152, (1, 1, 16, 16, 16)), (200, (1, 1, 15, 13, 11)),
]


@pytest.mark.parametrize("depth,shape", FORWARD_CASES)
def test_forward_matches_reference(depth, shape):
    torch.manual_seed(depth)
    model = randomize_bn(med3d_hub.create_model(f"resnet{depth}", num_classes=0)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = reference_forward(model.state_dict(), depth, x)
        pooled = model(x)
    assert ours.shape == ref.shape
    assert ours.shape[1] == model.num_features == 512 * (4 if depth >= 50 else 1)
    assert rel_err(ours, ref) < 1e-5
    assert torch.allclose(pooled, ref.mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)


def test_output_stride_and_paper_shape():
    """A 56x448x448 input gives a 7x56x56 map (REFERENCE.md); checked on the meta device."""
    with torch.device("meta"):
        model = med3d_hub.create_model("resnet50", num_classes=0)
        assert model.forward_features(torch.empty(1, 1, 56, 448, 448)).shape == (1, 2048, 7, 56, 56)


@pytest.mark.parametrize("depth", [10, 50])
def test_strided_layout(depth):
    torch.manual_seed(0)
    model = randomize_bn(med3d_hub.create_model(f"resnet{depth}", num_classes=0, dilated=False)).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = reference_forward(model.state_dict(), depth, x, dilated=False)
    assert ours.shape[2:] == (2, 2, 2)  # output stride 32
    assert rel_err(ours, ref) < 1e-5
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("depth,shortcut", [(10, "A"), (18, "B"), (50, "A")])
def test_shortcut_override(depth, shortcut):
    torch.manual_seed(1)
    model = randomize_bn(med3d_hub.create_model(f"resnet{depth}", num_classes=0, shortcut=shortcut)).eval()
    assert set(model.state_dict()) == expected_keys(depth, shortcut)
    x = torch.randn(1, 1, 20, 24, 28)
    with torch.no_grad():
        assert rel_err(model.forward_features(x), reference_forward(model.state_dict(), depth, x, shortcut)) < 1e-5


def test_shortcut_a_passes_gradients():
    """Upstream detaches shortcut A by accident; ours must carry the gradient."""
    from med3d_hub.networks.resnet import ShortcutA

    x = torch.randn(2, 64, 8, 9, 10, requires_grad=True)
    out = ShortcutA(128, stride=2)(x)
    assert out.shape == (2, 128, 4, 5, 5)
    assert torch.equal(out[:, :64], x[:, :, ::2, ::2, ::2]) and not out[:, 64:].any()
    out.sum().backward()
    expected = torch.zeros_like(x)
    expected[:, :, ::2, ::2, ::2] = 1
    assert torch.equal(x.grad, expected)

    # In a whole network: with the residual branch of layer2.0 zeroed, the only way a gradient
    # reaches layer1's weights through layer2 is the shortcut.
    model = med3d_hub.create_model("resnet18", num_classes=0)
    assert model.shortcut == "A"
    with torch.no_grad():
        model.layer2[0].bn2.weight.zero_()
        model.layer2[0].bn2.bias.zero_()
    model.layer2(torch.relu(model.layer1(torch.randn(1, 64, 8, 8, 8)))).sum().backward()
    assert model.layer1[1].conv2.weight.grad.abs().sum() > 0


def test_features_only_shapes_and_info():
    model = randomize_bn(med3d_hub.create_model("resnet34", features_only=True, out_indices=(0, 1, 2, 3, 4))).eval()
    x = torch.randn(1, 1, 23, 37, 41)
    with torch.no_grad():
        maps = model(x)
        ref = reference_forward(model.state_dict(), 34, x)
    assert [m.shape[1] for m in maps] == model.feature_info.channels() == [64, 64, 128, 256, 512]
    assert model.feature_info.reduction() == [2, 4, 8, 8, 8]
    assert [tuple(m.shape[2:]) for m in maps] == [(12, 19, 21), (6, 10, 11), (3, 5, 6), (3, 5, 6), (3, 5, 6)]
    assert rel_err(maps[-1], ref) < 1e-5
    bottleneck = med3d_hub.create_model("resnet50", features_only=True, out_indices=(2, 4))
    assert bottleneck.feature_info.channels() == [512, 2048]
    assert [m.shape[1] for m in bottleneck.eval()(torch.randn(1, 1, 16, 16, 16))] == [512, 2048]


def test_classifier_head_surface():
    model = med3d_hub.create_model("resnet10")
    assert model.num_classes == 2 and model.get_classifier().out_features == 2  # documented default
    x = torch.randn(2, 1, 16, 16, 16)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
        logits = model(x)
        assert torch.allclose(logits, model.fc(feats.mean(dim=(2, 3, 4))), atol=1e-6)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and set(model.state_dict()) >= {"fc.weight", "fc.bias"}
    model.reset_classifier(0)
    assert model(x).shape == (2, 512) and "fc.weight" not in model.state_dict()
    assert isinstance(model.get_classifier(), torch.nn.Identity)


def test_in_chans():
    model = med3d_hub.create_model("resnet18", in_chans=4, num_classes=2).eval()
    assert model.conv1.weight.shape == (64, 4, 7, 7, 7)
    assert model(torch.randn(1, 4, 16, 16, 16)).shape == (1, 2)


def test_segmentation_head():
    model = randomize_bn(med3d_hub.create_model("resnet10", seg_classes=3)).eval()
    keys = set(model.state_dict()) - expected_keys(10)
    assert keys == {
        "conv_seg.0.weight", "conv_seg.0.bias",
        *(f"conv_seg.{i}.{k}" for i in (1, 4) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
        "conv_seg.3.weight", "conv_seg.6.weight",
    }
    x = torch.randn(1, 1, 32, 40, 48)
    with torch.no_grad():
        logits = model(x)
        sd = model.state_dict()
        feats = reference_forward(sd, 10, x)
        y = F.conv_transpose3d(feats, sd["conv_seg.0.weight"], sd["conv_seg.0.bias"], stride=2)
        y = F.relu(_bn(sd, "conv_seg.1", y))
        y = F.relu(_bn(sd, "conv_seg.4", F.conv3d(y, sd["conv_seg.3.weight"], padding=1)))
        y = F.conv3d(y, sd["conv_seg.6.weight"])
    assert logits.shape == (1, 3, 8, 10, 12)  # 1/4 of the input
    assert rel_err(logits, y) < 1e-5
    classifier = model.get_submodule(model.pretrained_cfg["classifier"])  # the name timm's tools look it up by
    assert classifier is model.conv_seg[-1] and classifier.out_channels == 3
    up = med3d_hub.create_model("resnet10", seg_classes=3, seg_upsample=True).eval()
    with torch.no_grad():
        assert up(x).shape == (1, 3, 32, 40, 48)


def test_grad_checkpointing_equivalence():
    torch.manual_seed(0)
    model = med3d_hub.create_model("resnet18", num_classes=3)
    x = torch.randn(2, 1, 16, 20, 24)
    plain = med3d_hub.create_model("resnet18", num_classes=3)
    plain.load_state_dict(model.state_dict())
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.square().sum().backward()
    out_plain = plain(x)
    out_plain.square().sum().backward()
    assert torch.allclose(out_ckpt, out_plain, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_drop_path():
    model = med3d_hub.create_model("resnet10", num_classes=0, drop_path_rate=0.2)
    from timm.layers import DropPath

    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])  # linear over blocks, first block exempt
    x = torch.randn(2, 1, 16, 16, 16)
    model.eval()
    with torch.no_grad():  # identity at eval time
        plain = med3d_hub.create_model("resnet10", num_classes=0)
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(model(x), plain.eval()(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown model 'resnet20'.*10, 18, 34, 50, 101, 152, 200.*Did you mean"):
        med3d_hub.create_model("resnet20")
    with pytest.raises(ValueError, match="in_chans must be an integer >= 1"):
        med3d_hub.create_model("resnet10", in_chans=0)
    with pytest.raises(ValueError, match="unknown argument.*depth"):
        med3d_hub.create_model("resnet10", depth=10)
    with pytest.raises(ValueError, match="shortcut='C'"):
        med3d_hub.create_model("resnet10", shortcut="C")
    with pytest.raises(ValueError, match="not both"):
        med3d_hub.create_model("resnet10", num_classes=4, seg_classes=3)
    with pytest.raises(ValueError, match="out_indices"):
        med3d_hub.create_model("resnet10", features_only=True, out_indices=(5,))
    model = med3d_hub.create_model("resnet10")
    with pytest.raises(ValueError, match=r"5-D input N x C x D x H x W, got shape \(1, 16, 16, 16\)"):
        model(torch.randn(1, 16, 16, 16))
    with pytest.raises(ValueError, match="expected 1 input channel.*in_chans=3"):
        model(torch.randn(1, 3, 16, 16, 16))


def test_architecture_table_is_the_reference():
    for depth, (bottleneck, blocks, shortcut) in SPEC.items():
        arch = ARCHITECTURES[f"resnet{depth}"]
        assert (arch["block"] == "bottleneck", arch["layers"], arch["shortcut"]) == (bottleneck, blocks, shortcut)
