"""``med3d demo``: real scans in, embeddings and a picture out.

The scans come from packages, so the demo needs no download besides the weights:

* ``mni``: nilearn's MNI152 T1 template (the skull-stripped ICBM 2009a brain that
  ``nilearn.datasets.load_mni152_template`` loads), an MRI at 1 mm;
* ``ct``: the InVesalius head CT, ``Cranium.inv3`` of Debian's ``invesalius-examples`` package,
  when it is installed.

For each scan the demo reads it, preprocesses it with the model's transforms, extracts the layer4
map and the pooled embedding, prints what it did, and saves a PNG: the three mid-planes of the
preprocessed scan above the same planes with the layer4 activation (channel mean, upsampled)
overlaid. The embeddings go to ``embeddings.npz`` beside the pictures. ``preview_scan`` (``med3d
preview``) draws the same planes of the network input alone, with no model run.

nilearn and matplotlib are imported only here (``pip install med3d-hub[demo]``).
"""

from __future__ import annotations

import os
import plistlib
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.io import Volume, VolumeReadError, read_volume
from ..data.preprocess import Preprocess, transforms_for
from ..errors import MissingFileError, UsageError
from ..files import atomic_write
from .features import FeatureExtractionError, describe_preprocess, iter_features, save_features

__all__ = ["CRANIUM_INV3", "DEFAULT_SCANS", "DemoResult", "load_scan", "preview_scan", "read_inv3", "run_demo",
           "save_picture"]

CRANIUM_INV3 = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
DEFAULT_SCANS = ("mni", "ct")
_INV3_AXIAL = (1, "AXIAL", "axial")


@dataclass(frozen=True)
class DemoScan:
    label: str  # short, used in file names
    title: str
    volume: Volume


@dataclass(frozen=True)
class DemoResult:
    label: str
    embedding: np.ndarray  # (C,)
    feature_map_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    picture: Path


# -- the scans ------------------------------------------------------------------------------------


def read_inv3(path: str | os.PathLike) -> Volume:
    """Read the image of an InVesalius 3 project (``.inv3``) as a canonical ``Volume``.

    An ``.inv3`` file is a tar archive (gzip-compressed or not) holding ``main.plist``, whose
    ``matrix`` entry gives the ``filename``, ``shape`` (slices, rows, columns) and ``dtype`` of a raw
    C-order array, and whose ``spacing`` is (column, row, slice) in mm. InVesalius stores axial
    slices from inferior to superior with rows running posterior -> anterior; columns follow the
    DICOM convention (the first column is the patient's right), so they are flipped to make
    W run left -> right. Masks, surfaces and measurements in the project are ignored. Nothing is
    extracted to disk and nothing is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such InVesalius project file")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise VolumeReadError(f"{path}: not an InVesalius project (no main.plist in the archive)")
            project = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = project.get("matrix")
            if not isinstance(matrix, dict) or not {"filename", "shape", "dtype"} <= set(matrix):
                raise VolumeReadError(f"{path}: main.plist has no matrix entry (filename, shape, dtype)")
            shape = tuple(int(n) for n in matrix["shape"])
            dtype = np.dtype(str(matrix["dtype"])).newbyteorder("<")
            name = Path(str(matrix["filename"])).name
            if name not in members:
                raise VolumeReadError(f"{path}: the archive lacks the image data {name}")
            raw = tar.extractfile(members[name]).read()
    except (tarfile.TarError, plistlib.InvalidFileException, EOFError, OSError, TypeError, ValueError) as err:
        if isinstance(err, (VolumeReadError, FileNotFoundError)):
            raise
        raise VolumeReadError(f"{path}: not a readable InVesalius project ({type(err).__name__}: {err})") from err
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeReadError(f"{path}: matrix shape {shape} is not a 3-D volume")
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise VolumeReadError(
            f"{path}: {name} holds {len(raw)} bytes, but shape {shape} of {dtype.name} needs "
            f"{int(np.prod(shape)) * dtype.itemsize}; the project is truncated or damaged"
        )
    orientation = project.get("orientation", 1)
    if orientation not in _INV3_AXIAL:
        raise VolumeReadError(f"{path}: only axial InVesalius projects are supported (orientation {orientation!r})")
    try:
        sx, sy, sz = (float(s) for s in project["spacing"])
    except (KeyError, TypeError, ValueError):
        raise VolumeReadError(f"{path}: main.plist lacks a valid spacing (three numbers)") from None
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)[:, :, ::-1].astype(dtype.newbyteorder("="))
    spacing = (sz, sy, sx)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = sz, sy, sx, 1.0  # d -> S, h -> A, w -> R
    return Volume(array=np.ascontiguousarray(array), spacing=spacing, affine=affine, source=str(path))


def _mni152() -> Volume:
    """nilearn's MNI152 T1 template, read from nilearn's own file like any NIfTI scan."""
    try:
        import nilearn.datasets as datasets
    except ImportError:
        raise UsageError("the demo's MRI comes with nilearn: pip install 'med3d-hub[demo]'") from None
    path = getattr(datasets, "MNI152_FILE_PATH", None)
    if path and Path(path).is_file():
        return read_volume(path)
    import nibabel as nib

    image = datasets.load_mni152_template(resolution=1)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "mni152_t1.nii.gz"
        nib.save(image, file)
        return read_volume(file)


def load_scan(spec: str) -> DemoScan | None:
    """``"mni"``, ``"ct"`` (None when the Debian package is not installed) or a path."""
    if spec == "mni":
        return DemoScan("mni152", "MNI152 T1 template (nilearn; MRI, skull-stripped, 1 mm)", _mni152())
    if spec == "ct":
        if not CRANIUM_INV3.is_file():
            return None
        return DemoScan("cranium_ct", "InVesalius head CT 'Cranium' (Debian invesalius-examples)", read_inv3(CRANIUM_INV3))
    path = Path(spec).expanduser()
    volume = read_inv3(path) if path.name.lower().endswith(".inv3") else read_volume(path)
    label = path.name.split(".")[0] or "scan"
    return DemoScan("".join(c if c.isalnum() or c in "-_" else "_" for c in label), str(path), volume)


# -- the run --------------------------------------------------------------------------------------


def _identity(array: np.ndarray) -> torch.Tensor:
    """The volumes are preprocessed already (and timed) before they reach the features code."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]


def run_demo(
    model: nn.Module,
    *,
    weights: str,
    random_weights: bool = False,
    model_name: str = "",
    scans: Sequence[str] | None = None,
    out_dir: str | os.PathLike = "med3d_demo",
    preprocess: Preprocess | None = None,
    device: str | torch.device | None = "auto",
    amp: str | None = None,
    force_amp: bool = False,
    echo: Callable[[str], Any] = print,
) -> list[DemoResult]:
    """Run ``model`` on the demo scans; print each step through ``echo``; return one result per scan.

    ``weights`` describes the weights for the printout (``random_weights`` makes it shout);
    ``preprocess`` defaults to the weights' own, ``transforms_for(model)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = transforms_for(model) if preprocess is None else preprocess
    model_name = model_name or type(model).__name__
    echo(f"med3d demo: Med3D {model_name} with {weights}")
    if random_weights:
        echo("  WARNING: RANDOM WEIGHTS - the features below carry no learned meaning")
    echo(f"  preprocessing: {describe_preprocess(preprocess)}")

    scans = list(scans or DEFAULT_SCANS)
    loaded: list[DemoScan] = []
    results: list[DemoResult] = []
    for spec in scans:
        start = time.perf_counter()
        scan = load_scan(spec)
        if scan is None:
            echo(f"  (skipping the head CT: {CRANIUM_INV3} is not installed; `apt install invesalius-examples` adds it)")
            continue
        loaded.append(scan)
        v = scan.volume
        echo(f"scan {len(loaded)}: {scan.title}")
        echo(f"  read          {_x(v.shape)} voxels (D x H x W), {_x(v.spacing, '{:.3g}')} mm, "
             f"{v.array.dtype}, from {v.source} ({time.perf_counter() - start:.2f} s)")
        results.append(
            _run_one(model, scan, preprocess, out_dir, model_name, weights, random_weights, device, amp, force_amp, echo)
        )
    if not results:
        raise UsageError("no scan to run on: pass --scan mni or a path to a scan")

    if len(results) == 2:
        a, b = (r.embedding for r in results)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        echo(f"cosine similarity of the two embeddings: {cosine:.3f}")
    table = out_dir / "embeddings.npz"
    save_features(table, np.stack([r.embedding for r in results]), [r.label for r in results])
    echo(f"embeddings of {len(results)} scan(s) written to {table}")
    return results


def _check_finite(scan: DemoScan) -> None:
    """NaN or infinite voxels are refused before preprocessing could clip or spread them into numbers."""
    array = scan.volume.array
    if np.issubdtype(array.dtype, np.inexact):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise UsageError(f"{scan.title}: {bad:,} of {array.size:,} voxels are NaN or infinite; the demo needs a "
                             "finite scan (`med3d features --nan-policy zero` sets such voxels to 0)")


def _run_one(model, scan, preprocess, out_dir, model_name, weights, random_weights, device, amp, force_amp, echo) -> DemoResult:
    _check_finite(scan)
    start = time.perf_counter()
    x = preprocess(scan.volume)[0].numpy()  # (D, H, W)
    echo(f"  preprocessed  1 x 1 x {_x(x.shape)} network input, mean {x.mean():.2f}, std {x.std():.2f} "
         f"({time.perf_counter() - start:.2f} s)")
    start = time.perf_counter()
    (result,) = list(iter_features(model, [x], preprocess=_identity, maps="layer4", device=device,
                                   amp=amp, force_amp=force_amp))
    if not result.ok:  # the scan, not the package: the error names what was wrong with it
        raise FeatureExtractionError([(scan.title, result.error)], 1)
    forward = time.perf_counter() - start
    fmap = torch.from_numpy(result.features)  # (C, d, h, w)
    embedding = fmap.mean(dim=(1, 2, 3)).numpy()  # the global average pool of forward_head
    echo(f"  layer4 map    {_x(fmap.shape)} (channels x d x h x w, output stride 8)")
    head = " ".join(f"{v:.3f}" for v in embedding[:4])
    echo(f"  embedding     {embedding.shape[0]}-d, L2 norm {np.linalg.norm(embedding):.3f}, "
         f"first values {head} ... (forward {forward:.2f} s incl. model preparation)")
    activation = F.interpolate(fmap.mean(0)[None, None], size=x.shape, mode="trilinear", align_corners=False)[0, 0]
    picture = out_dir / f"{scan.label}_{model_name or 'model'}.png"
    shown = "RANDOM WEIGHTS (untrained: the activations carry no learned meaning)" if random_weights else weights
    title = f"{scan.title}\nMed3D {model_name}, {shown}"
    save_picture(picture, x, activation.numpy(), _voxel_mm(scan.volume, preprocess, x.shape), title)
    echo(f"  picture       {picture}")
    return DemoResult(scan.label, embedding, tuple(fmap.shape), tuple(x.shape), picture)


def _x(values, fmt: str = "{}") -> str:
    return " x ".join(fmt.format(v) for v in values)


def _voxel_mm(volume: Volume, p: Preprocess, shape: Sequence[int]) -> tuple[float, ...]:
    """The physical size of a preprocessed voxel, for drawing the planes with the right aspect."""
    spacing = np.array(volume.spacing, dtype=float)
    extent = np.array(volume.shape, dtype=float) * spacing
    if p.crop_foreground is True:
        nonzero = np.nonzero(volume.array)
        if nonzero[0].size:
            extent = np.array([a.max() - a.min() + 1 for a in nonzero], dtype=float) * spacing
    elif p.crop_foreground == "blank_planes":
        kept = int((volume.array > p.intensity["min"]).reshape(len(volume.array), -1).any(axis=1).sum())
        extent[0] = max(kept, 1) * spacing[0]
    step = np.array(p.spacing, dtype=float) if p.spacing else spacing
    if p.size is None or p.size_mode == "crop_pad":
        return tuple(step)
    return tuple(extent / np.array(shape, dtype=float))


def preview_scan(path: str | os.PathLike, preprocess: Preprocess, output: str | os.PathLike, recipe: str = "") -> Path:
    """The three mid-planes of exactly the tensor the network receives for ``path``, described in the title."""
    volume = read_volume(path)
    x = preprocess(volume)[0].numpy()  # (D, H, W)
    voxel = _voxel_mm(volume, preprocess, x.shape)
    title = (f"{path}\nnetwork input 1 x 1 x {_x(x.shape)}, voxel {_x(voxel, '{:.3g}')} mm, "
             f"intensity {float(x.min()):.4g} .. {float(x.max()):.4g}\n"
             f"{recipe + ': ' if recipe else ''}{describe_preprocess(preprocess)}")
    return save_picture(output, x, None, voxel, title)


# -- the picture ----------------------------------------------------------------------------------


def save_picture(
    path: str | os.PathLike,
    volume: np.ndarray,
    activation: np.ndarray | None,
    voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> Path:
    """Three mid-planes of ``volume`` (D, H, W) above the same planes with ``activation`` overlaid
    (the planes alone when ``activation`` is None).

    Orientation: axial seen from above with anterior up, coronal and sagittal with superior up;
    the patient's left is on the left of the image (neurological convention).
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the demo's pictures are drawn with matplotlib: pip install 'med3d-hub[demo]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    d, h, w = (n // 2 for n in volume.shape)
    vd, vh, vw = voxel_mm
    rows = 1 if activation is None else 2
    shown = volume if activation is None else activation
    planes = [  # (name, plane of the volume, plane of the activation, aspect = row mm / column mm)
        ("axial (mid D)", volume[d], shown[d], vh / vw),
        ("coronal (mid H)", volume[:, h, :], shown[:, h, :], vd / vw),
        ("sagittal (mid W)", volume[:, :, w], shown[:, :, w], vd / vh),
    ]
    low, high = np.percentile(volume, [1, 99.5])
    fig, axes = plt.subplots(rows, 3, figsize=(13, 4.9 * rows), dpi=100, squeeze=False)
    for column, (name, image, act, aspect) in enumerate(planes):
        for row in range(rows):
            ax = axes[row, column]
            ax.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, column].set_title(f"scan, {name}", fontsize=10)
        if activation is not None:
            overlay = axes[1, column].imshow(act, cmap="inferno", alpha=0.5, vmin=float(activation.min()),
                                             vmax=float(activation.max()), origin="lower", aspect=aspect,
                                             interpolation="bilinear")
            axes[1, column].set_title(f"layer4 activation, {name}", fontsize=10)
    if activation is not None:
        fig.colorbar(overlay, ax=axes[1, :].tolist(), shrink=0.8, label="mean layer4 activation")
    fig.suptitle(title, fontsize=11)
    if activation is None:
        fig.subplots_adjust(top=0.78)  # room for the three lines of the recipe
    fig.text(0.01, 0.01, "neurological view: patient's left on the left; anterior / superior up", fontsize=8)
    try:
        with atomic_write(path, fsync=True) as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return path
