"""Export the co-trained encoder on its own: ``encoder.safetensors`` with the zoo's backbone keys.

The file holds exactly the keys of ``create_model(arch, num_classes=0).state_dict()`` (MedicalNet's
backbone names without ``module.``, BatchNorm running statistics included), so it loads strictly
into the zoo's models and through ``create_model(arch, pretrained=PATH)``. The decoder branches
are dropped, as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..files import atomic_write
from ..weights.factory import create_model
from .checkpoint import load_checkpoint

__all__ = ["encoder_state_dict", "export_encoder", "export_from_checkpoint"]


def encoder_state_dict(model_state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of a co-training state dict, renamed to the backbone's keys and checked."""
    state = {k.removeprefix("encoder."): v for k, v in model_state.items() if k.startswith("encoder.")}
    expected = set(create_model(arch, num_classes=0).state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise UsageError(f"encoder keys do not match {arch}'s backbone: missing {missing[:5]}, unexpected {extra[:5]}")
    # safetensors stores dense row-major tensors: undo channels_last and share nothing.
    return {k: v.detach().cpu().contiguous().clone() for k, v in sorted(state.items())}


def export_encoder(model_state: dict[str, torch.Tensor], arch: str, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save

    tensors = encoder_state_dict(model_state, arch)
    meta = {"format": "pt", "arch": arch, "producer": "med3d_hub.train"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    with atomic_write(path, fsync=True) as f:
        f.write(save(tensors, metadata=meta))
    return path


def export_from_checkpoint(checkpoint: str | Path, path: str | Path) -> Path:
    """Write ``encoder.safetensors`` from a training checkpoint (for a run stopped before its end)."""
    state = load_checkpoint(Path(checkpoint))
    arch = state["config"]["model"]
    return export_encoder(state["model"], arch, path, {"steps": state["step"], "tasks": ",".join(state["tasks"])})
