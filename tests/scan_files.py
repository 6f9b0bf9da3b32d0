"""Real scans and weight files on disk for the feature, command-line and demo tests.

- nilearn's MNI152 T1 template (2 mm), written as NIfTI and as an axial DICOM series stored the way
  scanners do (rows anterior -> posterior, columns right -> left), so both must read back alike;
- pydicom's bundled 5-slice CT series ``CT5N``;
- a damaged file;
- a MedicalNet-format weights file with random values (``{"state_dict": {"module." + k: v}}``);
- small InVesalius projects (``.inv3``);
- ``run_med3d``: the command in a subprocess, with an environment that can never reach the real Hub.
"""

from __future__ import annotations

import io
import json
import os
import plistlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def ct5n() -> Path:
    import pydicom

    return Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/98892001/CT5N"


def mni_template() -> tuple[np.ndarray, np.ndarray]:
    """The 2 mm MNI152 T1 template as int16 (0-255) on its RAS+ (i, j, k) grid, and its affine."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=2)
    data = np.round(np.asarray(image.dataobj, dtype=np.float64) * 255).astype(np.int16)
    return data, image.affine.copy()


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_dicom_series(folder: Path, ras: np.ndarray, affine: np.ndarray, series_uid: str = "1.2.826.0.1.3680043.8.498.77") -> Path:
    """Write RAS+ (i, j, k) data with a diagonal affine as axial CT slices in LPS, scrambled file order.

    Pixel (row r, column c) of slice k is voxel (i = n_i-1-c, j = n_j-1-r, k): rows run anterior ->
    posterior and columns right -> left, as ImageOrientationPatient 1\\0\\0\\0\\1\\0 says.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n_i, n_j, n_k = ras.shape
    si, sj, sk = np.diag(affine)[:3]
    origin = affine[:3, 3]
    stored = ras.astype(np.int32) + 1024  # RescaleIntercept -1024, as CT does
    for k in np.random.default_rng(0).permutation(n_k):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, int(k) + 1
        right = origin[0] + (n_i - 1) * si  # RAS x of column 0
        anterior = origin[1] + (n_j - 1) * sj  # RAS y of row 0
        ds.ImagePositionPatient = [-right, -anterior, origin[2] + k * sk]  # LPS
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [sj, si]
        ds.SliceThickness = sk
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows, ds.Columns = n_j, n_i
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        pixels = stored[::-1, ::-1, k].T.astype(np.uint16)  # (row = j reversed, column = i reversed)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(folder / f"im_{(int(k) * 37) % 101:03d}.dcm", enforce_file_format=True)
    return folder


def write_broken(path: Path) -> Path:
    """A file that claims to be NIfTI but holds a cut-off gzip stream."""
    import gzip

    path.write_bytes(gzip.compress(b"\0" * 4096)[:50])
    return path


def medicalnet_pth(path: Path, arch: str = "resnet10", seed: int = 0) -> Path:
    """A MedicalNet-format checkpoint with random weights and plausible BatchNorm statistics."""
    from med3d_hub.weights.hub_model import build_model

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=0)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("running_var"):
            value = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias", "downsample.1.bias")):
            value = (torch.rand(value.shape, generator=generator) - 0.5) * 0.2
        state["module." + key] = value
    torch.save({"state_dict": state}, path)
    return path


def manifest_entry(tag: str, data: bytes, preprocess: dict, *, model: str = "resnet10", default: bool = True) -> dict:
    """An entry of the weights manifest schema (see med3d_hub/weights/manifest.py) for a test Hub repo."""
    import hashlib

    return {
        "model": model,
        "tag": tag,
        "default": default,
        "hf_hub_id": "med3d-test/MedicalNet-Resnet10",
        "revision": "main",
        "filename": "resnet_10.pth",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "format": "medicalnet-pth",
        "shortcut": "B",
        "license": "MIT",
        "source": {"paper": "test weights (random values)", "datasets": ["none"]},
        "preprocess": preprocess,
        "description": "random test weights served by the test Hub",
    }


def write_manifest(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "weights": list(entries)}, indent=1))
    return path


def write_inv3(path: Path, matrix: np.ndarray, spacing_xyz=(0.8, 0.8, 2.0), *, compress: bool = True,
               plist_extra: dict | None = None, drop: str | None = None, truncate: int = 0) -> Path:
    """An InVesalius 3 project: a tar with <dir>/main.plist and <dir>/matrix.dat (raw, C order)."""
    project = {
        "format_version": 1,
        "invesalius_version": "test",
        "modality": "CT",
        "name": "synthetic",
        "orientation": 1,
        "spacing": [float(s) for s in spacing_xyz],
        "window_level": 40.0,
        "window_width": 400.0,
        "scalar_range": [int(matrix.min()), int(matrix.max())],
        "matrix": {"filename": "matrix.dat", "shape": list(matrix.shape), "dtype": str(matrix.dtype)},
        "masks": {},
        "surfaces": {},
    }
    project.update(plist_extra or {})
    raw = np.ascontiguousarray(matrix).astype(matrix.dtype.newbyteorder("<")).tobytes()
    files = {"main.plist": plistlib.dumps(project), "matrix.dat": raw[: len(raw) - truncate]}
    if drop:
        files.pop(drop)
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"tmpproject/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def closed_endpoint() -> str:
    from hub_server import closed_port_endpoint

    return closed_port_endpoint()


def med3d_env(tmp: Path, **extra: str) -> dict:
    """An environment for the command: a private HF_HOME, and a Hub endpoint nothing listens on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "MED3D_"))}
    env.update(
        HF_HOME=str(tmp / "hf_home"),
        HF_ENDPOINT=closed_endpoint(),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


def run_med3d(*args: str, env: dict, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m med3d_hub ARGS`` (the same entry point as the ``med3d`` script)."""
    return subprocess.run(
        [sys.executable, "-m", "med3d_hub", *map(str, args)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
