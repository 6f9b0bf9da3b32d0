"""MedicalNet checkpoints and zoo state dicts: reading, key mapping, strict checks, input adaptation.

A released MedicalNet file is a pickled dict whose ``state_dict`` holds backbone tensors under
``module.``-prefixed names. It is read with ``torch.load(weights_only=True)`` and nothing else; the
prefix is stripped, which gives exactly the zoo's parameter names. Safetensors files are read by
memory map. No network and no caches here: only tensors and names.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch

from ..errors import Med3DError, UsageError
from ..networks.registry import architecture_of

__all__ = [
    "HEAD_PREFIXES",
    "CheckpointMismatchError",
    "NonFiniteWeightsError",
    "adapt_in_chans",
    "architecture_of_keys",
    "check_backbone",
    "check_finite",
    "check_floating",
    "describe_head",
    "detect_format",
    "infer_shortcut",
    "read_state_dict",
    "split_head",
    "strip_prefix",
]

HEAD_PREFIXES = ("fc.", "conv_seg.")
_SHOWN = 12  # key names listed in an error before "and N more"
_SHOWN_NONFINITE = 8  # tensors listed, with their counts, in an error about NaN or infinity
# torch.save writes a zip archive (PyTorch >= 1.6) or, before that, a pickle (protocol byte 0x80)
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


class CheckpointMismatchError(Med3DError, RuntimeError):
    """The weights do not fit the model: missing, unexpected or differently shaped keys (all named)."""


def detect_format(path: str | os.PathLike) -> str:
    """``"safetensors"`` or ``"medicalnet-pth"`` (a torch.save file), from the name and the file's first bytes."""
    if os.fspath(path).lower().endswith(".safetensors"):
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return "medicalnet-pth"


def read_state_dict(path: str | os.PathLike, fmt: str) -> dict[str, torch.Tensor]:
    """The zoo-named state dict in a weights file: no ``module.`` prefixes, tensors only."""
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_prefix(load_file(str(path)))
        except (SafetensorError, ValueError, OSError, RuntimeError) as error:
            raise CheckpointMismatchError(
                f"{path} is not a readable safetensors file ({error}): it is damaged, truncated or not safetensors; "
                "re-download or re-export it"
            ) from None
    if fmt != "medicalnet-pth":
        raise UsageError(f"unknown weights format {fmt!r}; expected 'medicalnet-pth' or 'safetensors'")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(_TORCH_SAVE_MAGIC):
        raise CheckpointMismatchError(
            f"{path} is not a weights file: neither a PyTorch checkpoint (.pth, .pt) nor safetensors "
            f"(it starts with {head!r}); give a MedicalNet .pth or a .safetensors file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises many types; all mean "not a plain weights file"
        raise CheckpointMismatchError(
            f"{path} looks like a PyTorch checkpoint but could not be read with torch.load(weights_only=True) "
            f"({type(error).__name__}: {error}). "
            "Only plain tensors and containers are accepted; files that need arbitrary code to unpickle are refused."
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = sorted(obj)[:_SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointMismatchError(
            f"{path} is not a MedicalNet checkpoint: expected a dict of tensors, or a dict whose 'state_dict' "
            f"entry is one; found {found}"
        )
    return strip_prefix(obj)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop a leading ``module.`` (left by DataParallel) from every key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(prefix):
            name = name[len(prefix) :]
        if name in out:
            raise CheckpointMismatchError(f"keys {key!r} and another both become {name!r} without {prefix!r}")
        out[name] = value
    return out


def architecture_of_keys(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The zoo architecture whose block type and blocks per stage these backbone keys have (None if none fits)."""
    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in state_dict) else "basic"
    return architecture_of(block, (len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5)))


def split_head(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone, head): head keys are the classifier ``fc.*`` and the segmentation head ``conv_seg.*``."""
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
    head = {k: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIXES)}
    return backbone, head


def infer_shortcut(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Shortcut "B" has downsample convs, the parameter-free shortcut "A" has none."""
    return "B" if any(".downsample." in k for k in state_dict) else "A"


def describe_head(state: Mapping) -> str:
    """The head a state dict (or a dict of shapes) holds, in words, for errors and logs."""
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    if "fc.weight" in shape:
        return f"linear head fc with {shape['fc.weight'][0]} classes"
    seg = sorted(k for k in shape if k.startswith("conv_seg.") and k.endswith(".weight"))
    return f"segmentation head conv_seg with {shape[seg[-1]][0]} classes" if seg else "no head"


def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def check_backbone(expected: Mapping[str, tuple], state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strict check: the weights hold exactly the model's backbone keys, with the same shapes.

    ``expected`` maps the model's backbone keys to shapes. The error names every offending key and,
    where the pattern is recognisable, the option that fixes it.
    """
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    wrong = {
        k: (tuple(state_dict[k].shape), tuple(shape))
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    }
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if wrong:
        shown = sorted(wrong)[:_SHOWN]
        problems.append("shape mismatch: " + ", ".join(f"{k} {wrong[k][0]} in the file vs {wrong[k][1]} in the model" for k in shown))
    hints = []
    if missing and all(".downsample." in k for k in missing) and not unexpected:
        hints.append("the file has no downsample convs: it was trained with shortcut='A'")
    if unexpected and all(".downsample." in k for k in unexpected) and not missing:
        hints.append("the file has downsample convs: it was trained with shortcut='B'")
    if not hints and (missing or unexpected or wrong):
        hints.append("the file may be for another depth or architecture")
    raise CheckpointMismatchError(
        f"the weights in {source} do not fit the model ({'; '.join(problems)}). Hint: {'; '.join(hints)}."
    )


def adapt_in_chans(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weights for ``in_chans`` input channels, from weights trained on ``S = weight.shape[1]``.

    Rule: tile the S trained channels over the new ones (``ceil(in_chans / S)`` times, cut to
    ``in_chans``) and scale by ``S / in_chans``. From single-channel weights that is "repeat and divide
    by in_chans": a volume copied into all in_chans channels gives exactly the single-channel
    features, and the activations keep their scale. Going down to one channel sums the S channels,
    so one volume gives what S copies of it gave before.
    """
    if not isinstance(in_chans, int) or in_chans < 1:
        raise UsageError(f"in_chans must be an integer >= 1, got {in_chans!r}")
    trained = weight.shape[1]
    if in_chans == trained:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_chans / trained)
    tiled = weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :in_chans]
    return (tiled * (trained / in_chans)).contiguous()


class NonFiniteWeightsError(Med3DError, ValueError):
    """The weights hold NaN or infinite values; the message names the tensors."""


# The one integer tensor of a Med3D network: BatchNorm's step counter.
_INTEGER_KEYS = ("num_batches_tracked",)


def check_floating(state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse weights whose tensors are integers or booleans where the network holds floating-point values.

    Such a file is quantised or not a set of weights at all; copying it into a float model would fail
    deep inside torch, or silently truncate, so the message names the tensors and their dtypes.
    """
    bad = sorted(k for k, v in state_dict.items()
                 if not (v.is_floating_point() or v.is_complex()) and not k.endswith(_INTEGER_KEYS))
    if bad:
        shown = ", ".join(f"{k} ({str(state_dict[k].dtype).replace('torch.', '')})" for k in bad[:_SHOWN_NONFINITE])
        more = f" and {len(bad) - _SHOWN_NONFINITE} more tensors" if len(bad) > _SHOWN_NONFINITE else ""
        raise CheckpointMismatchError(
            f"the weights in {source} hold integer tensors where the model has floating-point weights: {shown}{more}. "
            "The file is quantised or is not a weights file; give the float (float32, float16 or bfloat16) weights."
        )


def check_finite(state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse weights with NaN or infinite values, naming the tensors."""
    bad = {}
    for key, value in state_dict.items():
        if (value.is_floating_point() or value.is_complex()) and not _sum_is_finite(value):
            count = int((~torch.isfinite(value)).sum())  # exact, for the rare tensor whose sum is not finite
            if count:
                bad[key] = count
    if bad:
        keys = sorted(bad)
        shown = ", ".join(f"{k} ({bad[k]} of {state_dict[k].numel()})" for k in keys[:_SHOWN_NONFINITE])
        more = f" and {len(keys) - _SHOWN_NONFINITE} more tensors" if len(keys) > _SHOWN_NONFINITE else ""
        raise NonFiniteWeightsError(
            f"the weights in {source} hold NaN or infinite values: {shown}{more}. The run diverged or the file is "
            "damaged; publish an earlier checkpoint (--checkpoint) or retrain with a lower learning rate."
        )


def _sum_is_finite(value: torch.Tensor) -> bool:
    """One cheap pass: any NaN or infinity makes the sum non-finite (a finite sum proves all values finite).

    numpy's reduction, because it runs at memory speed where torch's elementwise checks do not.
    """
    if value.dtype in (torch.float32, torch.float64, torch.float16) and value.device.type == "cpu":
        import numpy as np

        return bool(np.isfinite(value.detach().numpy().sum(dtype=np.float64)))
    return bool(torch.isfinite(value.detach().sum()))
