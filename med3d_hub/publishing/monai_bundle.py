"""Any model the package knows -> a MONAI bundle, the MONAI Model Zoo's format (MONAI Label, MONAI Deploy).

    export_bundle("resnet10.3dseg8", "bundle/", data_dir="scans/")  # `med3d export SOURCE --format monai-bundle`

The folder::

    configs/metadata.json    version, MONAI / PyTorch versions, network_data_format, licence, references,
                             optional_packages_version (med3d-hub builds the network)
    configs/inference.json   network_def (the network, for MONAI's ConfigParser), the weights' own
                             preprocessing as MONAI transforms, and a run that writes eval/outputs.npy
    models/model.pt          the network's state dict: tensors only, so torch.load(weights_only=True) reads it
    docs/README.md, LICENSE

The preprocessing is written as MONAI transforms, step for step as ``data/preprocess.py`` does it:
LoadImaged + Orientationd("RAS") + Transposed give the (D, H, W) order of ``data/io.py``; the
intensity steps are ClipIntensityPercentilesd / ThresholdIntensityd + NormalizeIntensityd; the
size is Resized (trilinear) or ResizeWithPadOrCropd. Two steps are MONAI's own and not bit-equal:
``spacing`` (Spacingd resamples by the affine) and ``crop_pad`` (MONAI centres an odd crop one
voxel the other way); ``nonzero_zscore`` takes the statistics of the non-zero voxels where
med3d-hub takes those above zero, and ``zscore`` divides by the std over N where med3d-hub divides
by N - 1 (a relative difference of 1 / 2N). ``window_scale`` is ScaleIntensityRanged onto [-1, 1].
``crop_foreground: "blank_planes"`` and ``size_mode: "resize_skimage"`` have no MONAI transform
and are refused. Without these, ``monai.bundle run`` gives ``med3d features``' numbers
(tests/test_deploy.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..data.preprocess import Preprocess
from ..errors import UsageError
from ..files import atomic_folder, atomic_write
from ..networks.finetune_net import FinetuneNet
from ..weights import model_files
from .deployable import Deployable, Source, load_deployable
from .onnx_export import require
from .run import license_id

__all__ = ["BUNDLE_FILES", "export_bundle", "monai_transforms", "network_def"]

BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE")
BUNDLE_VERSION = "0.1.0"
NIFTI_GLOB = "*.nii*"
MED3D_REFERENCE = "Chen S, Ma K, Zheng Y. Med3D: Transfer Learning for 3D Medical Image Analysis. arXiv:1904.00625, 2019"
_NET_KEYS = ("block", "layers", "shortcut", "in_chans", "num_classes", "seg_classes", "seg_upsample", "dilated",
             "drop_rate", "drop_path_rate")


def export_bundle(
    model: Source | Deployable,
    path: str | os.PathLike,
    *,
    license: str | None = None,
    data_dir: str | os.PathLike | None = None,
    architecture: str | None = None,
    preprocess: dict | None = None,
) -> Path:
    """Write a MONAI bundle of ``model`` into the new (or empty) folder ``path``; returns the folder.

    ``license``: the weights' licence id, required when the source does not state one.
    ``data_dir``: the folder of NIfTI files the inference config reads (``dataset_dir``; default
    ``/workspace/data``, MONAI's placeholder, to be overridden on the command line).
    """
    require("monai")
    output = Path(path).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output} exists and is not an empty folder; export into a new folder")
    found = model if isinstance(model, Deployable) else load_deployable(model, model=architecture, preprocess=preprocess)
    licence = license or found.license
    if not licence:
        raise UsageError(f"give the licence of the weights of {found.source} (--license mit, apache-2.0, cc-by-4.0, ...)")
    licence = license_id(licence)
    dataset_dir = str(Path(data_dir).expanduser().resolve()) if data_dir is not None else "/workspace/data"
    with atomic_folder(output) as tmp:
        for folder in ("configs", "models", "docs"):
            (tmp / folder).mkdir()
        state = {k: v.detach().clone().contiguous() for k, v in found.net.state_dict().items()}
        with atomic_write(tmp / "models" / "model.pt") as f:
            torch.save(state, f)
        _write_json(tmp / "configs" / "inference.json", inference_config(found, dataset_dir))
        _write_json(tmp / "configs" / "metadata.json", metadata(found, licence))
        with atomic_write(tmp / "docs" / "README.md", "w") as f:
            f.write(_readme(found, licence))
        with atomic_write(tmp / "LICENSE", "w") as f:
            f.write(_licence_text(found, licence))
    return output


def network_def(found: Deployable) -> dict:
    """The network as a ConfigParser component: med3d-hub's classes with the network's arguments."""
    encoder = _resnet_def(model_files.model_config(found.encoder))
    if not isinstance(found.net, FinetuneNet):
        return encoder
    net = found.net
    return {"_target_": "med3d_hub.models.FinetuneNet", "encoder": encoder, "task": net.task,
            "num_classes": int(net.num_classes), "decoder": net.decoder or "paper", "drop_rate": float(net.drop_rate)}


def _resnet_def(config: dict) -> dict:
    return {"_target_": "med3d_hub.models.Med3DResNet", **{k: config[k] for k in _NET_KEYS}}


def monai_transforms(preprocess: Preprocess) -> list[dict]:
    """``preprocess`` as MONAI dictionary transforms on the key ``image`` (see the module docstring)."""
    keys = "image"
    if preprocess.crop_foreground == "blank_planes" or preprocess.size_mode == "resize_skimage":
        step = "crop_foreground 'blank_planes'" if preprocess.crop_foreground == "blank_planes" else "size_mode 'resize_skimage'"
        raise UsageError(f"the preprocessing step {step} has no MONAI transform, so a bundle cannot run it; "
                         "export ONNX (--format onnx), whose sidecar carries the recipe, or give another --preprocess")
    steps: list[dict] = [
        {"_target_": "LoadImaged", "keys": keys, "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys, "channel_dim": "no_channel"},
        # voxel axes (i, j, k) = (W, H, D); nibabel's labels, so the meaning stays across MONAI versions
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
    ]
    if preprocess.spacing is not None:
        steps.append({"_target_": "Spacingd", "keys": keys, "pixdim": list(preprocess.spacing[::-1]), "mode": "bilinear"})
    steps.append({"_target_": "Transposed", "keys": keys, "indices": [0, 3, 2, 1]})  # (C, D, H, W) as data/io.py
    if preprocess.crop_foreground:
        steps.append({"_target_": "CropForegroundd", "keys": keys, "source_key": keys,
                      "select_fn": "$lambda x: x != 0", "margin": 0, "allow_smaller": True})
    intensity = preprocess.intensity
    method = intensity["method"]
    if method == "percentile_zscore":
        steps.append({"_target_": "ClipIntensityPercentilesd", "keys": keys,
                      "lower": intensity["lower"], "upper": intensity["upper"]})
    elif method == "window_scale":  # the window onto [-1, 1], clipped
        steps.append({"_target_": "ScaleIntensityRanged", "keys": keys, "a_min": intensity["min"],
                      "a_max": intensity["max"], "b_min": -1.0, "b_max": 1.0, "clip": True})
    elif method == "hu_window":
        steps += [{"_target_": "ThresholdIntensityd", "keys": keys, "threshold": intensity["max"], "above": False,
                   "cval": intensity["max"]},
                  {"_target_": "ThresholdIntensityd", "keys": keys, "threshold": intensity["min"], "above": True,
                   "cval": intensity["min"]}]
    if method not in ("none", "window_scale"):
        steps.append({"_target_": "NormalizeIntensityd", "keys": keys, "nonzero": method == "nonzero_zscore"})
    if preprocess.size is not None:
        if preprocess.size_mode == "resize":
            steps.append({"_target_": "Resized", "keys": keys, "spatial_size": list(preprocess.size),
                          "mode": "trilinear", "align_corners": False})
        else:
            steps.append({"_target_": "ResizeWithPadOrCropd", "keys": keys, "spatial_size": list(preprocess.size)})
    steps.append({"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32", "track_meta": False})
    return steps


def _is_vector(found: Deployable) -> bool:
    return found.task in (None, "cls")


def inference_config(found: Deployable, dataset_dir: str) -> dict:
    """configs/inference.json: every NIfTI file of ``dataset_dir``, preprocessed, through the network.

    Vector outputs (embeddings, class logits) are stacked into eval/outputs.npy, one row per file in
    the order of eval/inputs.txt; segmentation logits go to eval/outputs.npz, one array per file.
    """
    save = ("$numpy.save(os.path.join(@output_dir, 'outputs.npy'), numpy.stack(@outputs))" if _is_vector(found) else
            "$numpy.savez(os.path.join(@output_dir, 'outputs.npz'), "
            "**{os.path.basename(f): o for f, o in zip(@datalist, @outputs)})")
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "ckpt_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "dataset_dir": dataset_dir,
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": f"$sorted(glob.glob(os.path.join(@dataset_dir, '{NIFTI_GLOB}')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(found),
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": monai_transforms(found.preprocess)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "outputs": "$[@network(item['image'][None].to(@device)).cpu().numpy()[0] for item in @dataset]",
        "initialize": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True), strict=True)",
            "$os.makedirs(@output_dir, exist_ok=True)",
        ],
        "run": [
            save,
            "$open(os.path.join(@output_dir, 'inputs.txt'), 'w').write(''.join(f + chr(10) for f in @datalist))",
        ],
    }


def metadata(found: Deployable, licence: str) -> dict:
    """configs/metadata.json with the bundle schema's fields."""
    import monai
    import numpy

    from .. import __version__

    chans = found.encoder.in_chans
    size = list(found.preprocess.size) if found.preprocess.size else ["*", "*", "*"]
    if found.task is None:
        output = {"type": "embedding", "format": "features", "num_channels": found.encoder.num_features,
                  "spatial_shape": [], "channel_def": {}}
    elif found.task == "cls":
        output = {"type": "probabilities", "format": "logits", "num_channels": len(found.class_names),
                  "spatial_shape": [], "channel_def": dict(enumerate(found.class_names))}
    else:
        output = {"type": "image", "format": "segmentation logits", "num_channels": len(found.class_names),
                  "spatial_shape": size, "channel_def": dict(enumerate(found.class_names))}
    output = {**output, "dtype": "float32", "value_range": [], "is_patch_data": False}
    what = {None: "an encoder: the pooled layer4 embedding", "cls": "a classifier", "seg": "a segmenter"}[found.task]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by med3d-hub {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {},
        "optional_packages_version": {"med3d-hub": __version__, "nibabel": _version("nibabel")},
        "name": f"med3d_{found.architecture}",
        "task": f"Med3D {found.architecture}, {what}",
        "description": f"Med3D {found.architecture} from {found.source} ({what}), exported by med3d-hub",
        "authors": "med3d-hub",
        "copyright": "the authors of the weights; see LICENSE",
        "license": licence,
        "references": [MED3D_REFERENCE],
        "weights_sha256": found.weights_sha256,
        "preprocess": found.preprocess.to_dict(),
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT or MRI", "num_channels": chans,
                                 "spatial_shape": size, "dtype": "float32", "value_range": [], "is_patch_data": False,
                                 "channel_def": {str(c): "image" for c in range(chans)}}},
            "outputs": {"pred": {**output, "channel_def": {str(k): v for k, v in output["channel_def"].items()}}},
        },
    }


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _readme(found: Deployable, licence: str) -> str:
    output = "eval/outputs.npy (one row per file)" if _is_vector(found) else "eval/outputs.npz (one array per file)"
    return f"""# Med3D {found.architecture} (MONAI bundle)

Exported by med3d-hub from `{found.source}`; weights sha256 `{found.weights_sha256}`; licence `{licence}`.

The network is built by med3d-hub's classes (`pip install med3d-hub monai nibabel fire`).
Inference on a folder of NIfTI files, with the weights' own preprocessing as MONAI transforms:

```
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir /path/to/scans
```

It writes {output} and eval/inputs.txt (the files, in order).
Preprocessing: `{json.dumps(found.preprocess.to_dict())}`.
Class names: {", ".join(found.class_names) or "none (an encoder)"}.

Reference: {MED3D_REFERENCE}
"""


def _licence_text(found: Deployable, licence: str) -> str:
    return (f"The weights in models/model.pt ({found.source}, sha256 {found.weights_sha256}) are licensed under "
            f"{licence} (https://spdx.org/licenses/). The configs and docs were written by med3d-hub (MIT).\n")


def _write_json(path: Path, value: dict) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
