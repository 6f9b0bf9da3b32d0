"""Where a model runs and in which precision: one choice of device and one of autocast for every command.

Device: ``auto`` is this process's GPU when torch sees one, else the CPU; ``cuda`` without a
visible GPU is an error, never a silent fall back to the CPU.

Mixed precision (``amp``), one rule:

- ``none`` (or None, ``off``, ``fp32``): no autocast.
- ``auto``: bf16 on a GPU that supports it; on a CPU, and on older GPUs, fp32.
- ``bf16`` / ``fp16``: that autocast type. A GPU without bf16 is refused. A CPU gets it only where
  it computes the type natively (AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16): elsewhere autocast
  is emulated and hundreds of times slower than fp32, so it is refused unless forced.

Training and inference call these two functions; nothing else picks a device or an autocast type.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["autocast", "check_amp", "resolve_device"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None,
                   local_rank: int | None = None) -> torch.device:
    """The device to run on.

    ``None``: the model's device (CPU without one). ``auto``: a GPU when torch sees one, else the
    CPU. With ``local_rank`` (a process of torchrun), ``auto`` and ``cuda`` mean that process's GPU,
    ``cuda:<local_rank modulo the GPU count>``.
    """
    if device is None:
        param = next(model.parameters(), None) if model is not None else None
        return param.device if param is not None else torch.device("cpu")
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from err
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device} is not supported here; use cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device cuda was asked for, but torch sees no CUDA GPU (CPU-only build, no driver, or "
            "CUDA_VISIBLE_DEVICES is empty); use --device cpu."
        )
    if device.type == "cuda" and device.index is None and local_rank is not None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _native_cpu_amp(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` natively (else oneDNN emulates it, very slowly)."""
    probe = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }[dtype]
    for name in probe:
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # a probe that is missing or fails on this build counts as "no"
            pass
    return False


def check_amp(amp: str | None, device: torch.device, *, force: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: fp32), or an error (see the module docstring).

    ``force``: on a CPU without native support, warn instead of refusing.
    """
    if amp in (None, False, "none", "fp32", "off"):
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp not in _AMP_DTYPES:
        raise UsageError(f"unknown amp {amp!r}; use auto, bf16 or fp16 (or none for fp32).")
    dtype = _AMP_DTYPES[amp]
    label = "bf16" if dtype == torch.bfloat16 else "fp16"
    if device.type == "cpu" and not _native_cpu_amp(dtype):
        needs = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AMX-FP16"
        message = (
            f"{label} autocast on this CPU is emulated (it lacks {needs}) and runs hundreds of times "
            "slower than fp32, with no memory benefit worth it"
        )
        if not force:
            raise UsageError(f"{message}. Leave amp off on this machine (--amp none), or force it where the "
                             "command offers --force-amp.")
        warnings.warn(f"{message}; forced anyway.", RuntimeWarning, stacklevel=2)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bf16; use --amp fp16.")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing when ``dtype`` is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
