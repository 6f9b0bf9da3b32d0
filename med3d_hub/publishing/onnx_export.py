"""Any model the package knows -> ``model.onnx`` for onnxruntime, TensorRT, Triton or OpenVINO, checked.

    export_onnx("resnet10.3dseg8", "onnx/")                    # `med3d export SOURCE --format onnx -o DIR`
    export_onnx(model, "onnx/", returns="layer4")

The folder gets ``model.onnx`` (one input ``image``, N x C x D x H x W float32, with the batch and
the three spatial sizes dynamic; one output named by ``returns``) and ``model.json``, the sidecar:
the preprocessing the weights expect, the class names, the sha256 of the source weights, the opset,
which exporter ran, and the check's result.

The check runs before the folder appears: onnxruntime (CPU) runs the file on two input shapes and
each output must be within ``tolerance`` of PyTorch's, relative to the largest PyTorch value. A
failed check leaves nothing behind (``files.atomic_folder``).

The exporter is PyTorch's recommended one, the ``torch.export``-based ("dynamo") exporter, which
needs onnxscript; where it fails for the installed torch, the TorchScript-based exporter runs
instead, and the sidecar says which one wrote the file. Needs ``pip install med3d-hub[deploy]``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import EXIT_FAILED, Med3DError, UsageError
from ..files import atomic_folder, atomic_write
from .deployable import Deployable, Source, load_deployable

__all__ = ["DEFAULT_OPSET", "ONNX_FILE", "SIDECAR_FILE", "DeployError", "OnnxExport", "export_onnx", "require"]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
SIDECAR_FILE = "model.json"
SIDECAR_FORMAT = "med3d_hub.onnx.v1"
DEFAULT_OPSET = 18
TOLERANCE = 1e-4
# The shapes of the check. Neither D, H nor W is a multiple of 8 in the first, so the export sees
# the resize a segmentation network does when its map is not the input's size; the second is.
EXPORT_SPATIAL = (36, 44, 52)
CHECK_SPATIAL = (EXPORT_SPATIAL, (32, 48, 40))
EXPORTERS = ("auto", "dynamo", "torchscript")


class DeployError(Med3DError, RuntimeError):
    """An export that did not produce a working file; nothing was written."""

    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class OnnxExport:
    folder: Path
    sidecar: dict

    @property
    def file(self) -> Path:
        return self.folder / ONNX_FILE


def require(*modules: str) -> None:
    """Refuse early, with the install line, when the ``[deploy]`` extra is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"this export needs {', '.join(missing)}: pip install 'med3d-hub[deploy]'")


def export_onnx(
    model: Source | Deployable,
    path: str | os.PathLike,
    *,
    returns: str | None = None,
    architecture: str | None = None,
    preprocess: dict | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    check_shapes: Sequence[Sequence[int]] | None = None,
    tolerance: float = TOLERANCE,
) -> OnnxExport:
    """Write ``path/model.onnx`` and ``path/model.json`` for ``model``; ``path`` is a new (or empty) folder.

    ``model``: a model object, ``name.tag``, a run or model folder, or a weights file with
    ``architecture``. ``returns``: ``"embedding"``, ``"layer4"`` or ``"logits"`` (default: the
    logits of a model with a head, else the embedding). ``exporter``: ``"auto"`` (dynamo, then
    TorchScript), ``"dynamo"`` or ``"torchscript"``. ``check_shapes``: two (N, C, D, H, W) shapes
    for the check (default: 1 x C x 36 x 44 x 52 and 2 x C x 32 x 48 x 40).
    """
    require("onnx", "onnxruntime")
    if exporter not in EXPORTERS:
        raise UsageError(f"exporter={exporter!r}: choose one of {', '.join(EXPORTERS)}")
    output = Path(path).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output} exists and is not an empty folder; export into a new folder")
    found = model if isinstance(model, Deployable) else load_deployable(model, model=architecture, preprocess=preprocess)
    returns = returns or found.default_returns
    module = found.module(returns)
    chans = found.encoder.in_chans
    shapes = [tuple(int(n) for n in s) for s in check_shapes] if check_shapes else [(1, chans, *CHECK_SPATIAL[0]), (2, chans, *CHECK_SPATIAL[1])]
    if len(shapes) < 2 or any(len(s) != 5 or s[1] != chans or min(s) < 1 for s in shapes):
        raise UsageError(f"check_shapes must be two or more shapes (N, {chans}, D, H, W), got {check_shapes!r}")
    with atomic_folder(output) as tmp:
        ran = _export(module, tmp / ONNX_FILE, returns, chans, opset, exporter)
        check = _check(module, tmp / ONNX_FILE, shapes, tolerance)
        sidecar = _sidecar(found, returns, opset, ran, check)
        import json

        with atomic_write(tmp / SIDECAR_FILE, "w") as f:
            f.write(json.dumps(sidecar, indent=2) + "\n")
    return OnnxExport(output, sidecar)


def _export(module: torch.nn.Module, file: Path, returns: str, chans: int, opset: int, exporter: str) -> str:
    """Write the file with the dynamo exporter, or the TorchScript one; returns which ran."""
    example = torch.randn(1, chans, *EXPORT_SPATIAL)
    if exporter in ("auto", "dynamo"):
        try:
            _dynamo_export(module, example, file, returns, opset)
            return "dynamo"
        except Exception as error:  # any failure of the new exporter: the TorchScript one is the fallback
            if exporter == "dynamo":
                raise DeployError(f"the dynamo ONNX exporter failed for torch {torch.__version__}: {error}") from error
            log.warning("the dynamo ONNX exporter failed (%s: %s); exporting with the TorchScript-based one",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            file.unlink(missing_ok=True)
    _torchscript_export(module, example, file, returns, opset)
    return "torchscript"


def _dynamo_export(module, example, file: Path, returns: str, opset: int) -> None:
    dim = torch.export.Dim.DYNAMIC
    spatial = {0: dim, 2: dim, 3: dim, 4: dim}
    torch.onnx.export(module, (example,), str(file), dynamo=True, input_names=["image"], output_names=[returns],
                      opset_version=opset, dynamic_shapes={"image": spatial}, external_data=False,
                      verbose=False, optimize=True)


def _torchscript_export(module, example, file: Path, returns: str, opset: int) -> None:
    axes = {"image": {0: "batch", 2: "depth", 3: "height", 4: "width"}}
    axes[returns] = {0: "batch"} if returns == "embedding" or (returns == "logits" and _is_vector(module, example)) else \
        {0: "batch", 2: "out_depth", 3: "out_height", 4: "out_width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(module, (example,), str(file), dynamo=False, input_names=["image"], output_names=[returns],
                          opset_version=opset, dynamic_axes=axes)


def _is_vector(module, example) -> bool:
    with torch.no_grad():
        return module(example).ndim == 2


def _check(module: torch.nn.Module, file: Path, shapes: list[tuple[int, ...]], tolerance: float) -> dict:
    """onnxruntime against PyTorch on each shape; raises DeployError when one is off."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(file))
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    errors, outputs = [], []
    for shape in shapes:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = module(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        if got.shape != expected.shape:
            raise DeployError(f"the ONNX export gives shape {got.shape} for input {shape}, PyTorch {expected.shape}; "
                              "nothing was written")
        scale = float(np.abs(expected).max()) or 1.0
        error = float(np.abs(got - expected).max()) / scale
        if not np.isfinite(error) or error > tolerance:
            raise DeployError(f"the ONNX export differs from PyTorch by {error:.2e} (relative) for input {shape}, "
                              f"more than {tolerance:g}; nothing was written")
        errors.append(error)
        outputs.append(list(got.shape))
    return {"runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)", "shapes": [list(s) for s in shapes],
            "output_shapes": outputs,
            "max_relative_error": errors, "tolerance": tolerance, "passed": True,
            "error": "max |onnxruntime - torch| / max |torch| per shape"}


def _sidecar(found: Deployable, returns: str, opset: int, exporter: str, check: dict) -> dict:
    import onnx

    from .. import __version__

    chans = found.encoder.in_chans
    channels = len(found.class_names) if returns == "logits" else found.encoder.num_features
    vector = returns == "embedding" or (returns == "logits" and found.task == "cls")
    shape = ["batch", channels] if vector else ["batch", channels, "out_depth", "out_height", "out_width"]
    return {
        "format": SIDECAR_FORMAT,
        "file": ONNX_FILE,
        "architecture": found.architecture,
        "source": found.source,
        "weights_sha256": found.weights_sha256,
        "task": found.task,
        "returns": returns,
        "input": {"name": "image", "dtype": "float32", "shape": ["batch", chans, "depth", "height", "width"]},
        "output": {"name": returns, "dtype": "float32", "shape": shape},
        "class_names": found.class_names if returns == "logits" else [],
        "preprocess": found.preprocess.to_dict(),
        "opset": opset,
        "exporter": exporter,
        "versions": {"med3d_hub": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "check": check,
    }
