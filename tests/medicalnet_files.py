"""MedicalNet-format weight files for tests: random values, the released files' real layout.

A released file is ``torch.save({"state_dict": {"module." + key: tensor}})`` of a backbone (no
head), written by the PyTorch of 2019, so in the legacy (non-zip) serialisation. The bytes are made
once per process and are the same on every run (fixed seed).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path

import torch

MANIFEST_PREPROCESS = {
    "spacing": None,
    "intensity": {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5},
    "crop_foreground": True,
    "size": [56, 448, 448],
    "size_mode": "resize",
}


@functools.cache
def medicalnet_bytes(arch: str = "resnet10", seed: int = 0) -> bytes:
    """The bytes of a MedicalNet-format checkpoint of ``arch`` with random weights and BN statistics."""
    from med3d_hub.weights.hub_model import build_model

    generator = torch.Generator().manual_seed(seed)
    model = build_model(arch, num_classes=0)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.rand(value.shape, generator=generator) + (0.5 if "running_var" in key else -0.5)
        state["module." + key] = value
    buffer = io.BytesIO()
    torch.save({"state_dict": state}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tampered(data: bytes) -> bytes:
    """Same length, a few bytes changed in the middle (where tensor data lives)."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


@functools.cache
def state_dict_of(data: bytes) -> dict[str, torch.Tensor]:
    """The zoo-named state dict in MedicalNet bytes (read once; do not modify the result)."""
    state = torch.load(io.BytesIO(data), weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def entry(model: str, tag: str, data: bytes, **fields) -> dict:
    """A manifest entry for ``data`` hosted in a test repo; ``fields`` override any field."""
    depth = model.removeprefix("resnet")
    out = {
        "model": model,
        "tag": tag,
        "hf_hub_id": f"med3d-test/MedicalNet-Resnet{depth}",
        "revision": "main",
        "filename": f"resnet_{depth}.pth",
        "sha256": sha256(data),
        "size": len(data),
        "format": "medicalnet-pth",
        "shortcut": "A" if depth in ("18", "34") else "B",
        "license": "MIT",
        "source": {"paper": "test weights", "datasets": ["none"]},
        "preprocess": MANIFEST_PREPROCESS,
    }
    out.update(fields)
    return out


def write_manifest(path: Path, *entries: dict, **top) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "weights": list(entries), **top}, indent=1))
    return path


def files_with_content(root: Path, data: bytes) -> list[Path]:
    """Every regular file under ``root`` whose bytes equal ``data`` (compared by size, then sha256)."""
    digest = sha256(data)
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size == len(data):
            if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                found.append(path)
    return found
