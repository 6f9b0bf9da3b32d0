"""Building the fine-tuning network from a recipe, and turning a trained one into a zoo model.

The network itself (``FinetuneNet``: a Med3D encoder and the paper's decoder, MedicalNet's
``conv_seg`` head or a linear classifier) lives in ``networks/finetune_net.py``, so that a finished
run can be applied without the training code. ``to_zoo_model`` turns the trained network into a zoo
``Med3DResNet`` (``fc`` or ``conv_seg`` head) for ``save_pretrained`` / ``med3d publish``; the
paper's decoder is not a zoo head, so that model holds the fine-tuned encoder only.
"""

from __future__ import annotations

from torch import nn

from ..errors import UsageError
from ..networks.finetune_net import FinetuneNet, PaperDecoder  # noqa: F401  (their home is networks/)
from ..networks.registry import split_name
from ..weights.factory import create_model, resolve_pretrained
from ..weights.hub_model import build_model
from .finetune_config import FinetuneConfig

__all__ = ["FinetuneNet", "PaperDecoder", "build_finetune_net", "to_zoo_model"]


def build_finetune_net(cfg: FinetuneConfig, num_classes: int) -> FinetuneNet:
    """The encoder with ``cfg.pretrained`` loaded strictly, and a freshly initialised head."""
    arch, tag = split_name(cfg.model)
    if tag is not None:
        raise UsageError(f"model {cfg.model!r}: give the architecture as model and the weights as pretrained ({tag!r})")
    name, pretrained = resolve_pretrained(arch, cfg.pretrained)
    encoder = create_model(name, pretrained=pretrained, num_classes=0)
    if cfg.task == "seg":
        return FinetuneNet(encoder, "seg", num_classes, decoder=cfg.decoder)
    return FinetuneNet(encoder, "cls", num_classes, drop_rate=cfg.drop_rate)


def to_zoo_model(net: FinetuneNet) -> nn.Module:
    """The trained network as a zoo ``Med3DResNet`` (the paper's decoder is dropped: encoder only)."""
    enc = net.encoder
    arch_kwargs = {"shortcut": enc.shortcut, "in_chans": enc.in_chans, "dilated": enc.dilated}
    from ..weights.model_files import architecture_of

    arch = architecture_of(enc.block, enc.layers)
    state = {k: v for k, v in enc.state_dict().items()}
    if net.task == "cls":
        model = build_model(arch, num_classes=net.num_classes, drop_rate=net.drop_rate, **arch_kwargs)
        state.update({f"fc.{k}": v for k, v in net.head.state_dict().items()})
    elif net.decoder == "conv_seg":
        model = build_model(arch, seg_classes=net.num_classes, seg_upsample=True, **arch_kwargs)
        state.update({f"conv_seg.{k}": v for k, v in net.head.state_dict().items()})
    else:
        model = build_model(arch, num_classes=0, **arch_kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()
