"""Read 3-D medical volumes so that D x H x W means the same anatomical axes for every input.

A network trained on volumes in one orientation sees another orientation as a different image, so
every reader here ends in the same canonical voxel order:

* the voxel axes are first reoriented to the closest canonical RAS+ order (nibabel's
  ``io_orientation``: axis 0 points Right, axis 1 Anterior, axis 2 Superior, by flips and
  transposes only, never by resampling; an oblique volume takes the nearest such order);
* the array is then transposed to ``array[k, j, i]`` of that RAS+ array, so that
  **D = inferior -> superior, H = posterior -> anterior, W = left -> right**.

A NIfTI file, a DICOM series and an NRRD or MetaImage file (``.nrrd``, ``.nhdr``, ``.mha``,
``.mhd``, read by SimpleITK) go through this one code path (``_canonical``); they differ only in
how the voxel array and its voxel -> world affine are built (DICOM and ITK store LPS+, turned into
RAS+ here). ``.npy`` arrays carry no geometry and are taken to be in this order already, at 1 mm.

Several channels of one grid (a 4-D image's volumes, or one file per channel: ``read_channels``)
are a ``Volume`` whose array is (C, D, H, W); ``shape`` is always the (D, H, W) grid.

``Volume.affine`` maps ``(d, h, w, 1)`` to RAS+ millimetres, and ``Volume.spacing`` is the
length of its columns, so ``array``, ``spacing`` and ``affine`` always describe the same grid.

nibabel, pydicom and SimpleITK are imported inside the readers that need them, so ``import
med3d_hub`` does not pull them in; install them with ``pip install med3d-hub[io]``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Med3DError, MissingFileError, UsageError

__all__ = [
    "ALL_CHANNELS", "MAX_VOXELS_ENV", "SCAN_SUFFIXES", "Volume", "VolumeReadError", "dicom_series", "max_voxels",
    "read_channels", "read_volume",
]

MAX_VOXELS_ENV = "MED3D_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 1 << 30  # 1024^3: eight times a whole-body CT at 512 x 512 x 2000
_DEFLATE_MAX_RATIO = 1032  # gzip cannot expand more than this: a claim beyond it is a lie

# (d, h, w) -> (i, j, k): the canonical array is array[k, j, i] of the RAS+ voxel array.
_DHW_TO_IJK = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)
# DICOM patient coordinates are LPS+; NIfTI and this module use RAS+.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # NRRD and MetaImage, read by SimpleITK
SCAN_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES, ".npy")  # the files read_volume reads (a DICOM series is a folder)
ALL_CHANNELS = "all"  # channel=ALL_CHANNELS: every volume of a 4-D image, as channels
_FORMATS = ("a NIfTI file (.nii, .nii.gz), an NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, "
            "a folder holding a DICOM series, or a 3-D .npy array")


class VolumeReadError(Med3DError, ValueError):
    """A volume could not be read or is not a usable 3-D image; the message names the file."""


@dataclass(frozen=True, eq=False)  # arrays have no single truth value, so compare by identity
class Volume:
    """A 3-D image in canonical (D, H, W) voxel order; see the module docstring.

    ``array`` keeps the dtype it was stored with (DICOM: after RescaleSlope/Intercept, int16
    when that is exact, else float32); several channels of one grid are (C, D, H, W). ``spacing``
    is in mm along D, H, W. ``affine`` maps voxel ``(d, h, w)`` to RAS+ mm. ``source`` is the path
    the volume was read from (the first channel's file).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (D, H, W) grid, without the channel axis."""
        return tuple(self.array.shape[-3:])

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[0])


def read_volume(path: str | Path, *, channel: int | str | None = None, series: str | None = None) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file, a DICOM series folder or a ``.npy`` array into a canonical ``Volume``.

    ``channel`` picks one volume of a 4-D image (its 4th axis, or the components of a vector
    NRRD/MetaImage: modalities, e.g. the MSD brain tumour task's FLAIR/T1w/T1gd/T2w); ``"all"``
    keeps every one as a channel, an array of (C, D, H, W). Without it a real 4-D image is an error.
    ``series`` picks one SeriesInstanceUID of a DICOM folder (its sub-folders included); without it
    the folder must hold a single series.

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``VolumeReadError`` (a
    ``ValueError``) when it cannot be read or is not a single 3-D volume.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or folder; pass {_FORMATS}.")
    name = path.name.lower()
    if channel is not None:
        _check_channel_arg(channel)
        if not name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
            raise VolumeReadError(
                f"{path}: channel={channel} applies to 4-D NIfTI, NRRD and MetaImage images only."
            )
    if series is not None and not path.is_dir():
        raise VolumeReadError(f"{path}: series={series} applies to DICOM folders only.")
    if path.is_dir():
        array, affine = _read_dicom_series(path, series)
    elif name.endswith(NIFTI_SUFFIXES):
        array, affine = _read_nifti(path, channel)
    elif name.endswith(ITK_SUFFIXES):
        array, affine = _read_itk(path, channel)
    elif name.endswith(".npy"):
        return _read_npy(path)
    else:
        raise VolumeReadError(
            f"{path}: unknown file type; pass {_FORMATS} (for DICOM, pass the series folder)."
        )
    return _canonical(array, affine, path)


def read_channels(paths, *, series: str | None = None) -> Volume:
    """One file (or DICOM series) per channel, stacked into a (C, D, H, W) ``Volume``.

    The channels must share one voxel grid (shape and affine, to 1e-3 mm): a model sees voxel
    (d, h, w) of every channel as one point. A single path is read with ``channel="all"``.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if len(paths) == 1 and not paths[0].is_dir():
        return read_volume(paths[0], channel=ALL_CHANNELS)
    volumes = [read_volume(p, series=series if p.is_dir() else None) for p in paths]
    first = volumes[0]
    for index, volume in enumerate(volumes[1:], start=1):
        if volume.shape != first.shape or not np.allclose(volume.affine, first.affine, atol=1e-3):
            shift = float(np.abs(volume.affine - first.affine).max())
            raise VolumeReadError(
                f"{volume.source}: channel {index} is on another voxel grid than channel 0 ({first.source}): "
                + (f"shape {volume.shape} vs {first.shape}" if volume.shape != first.shape
                   else f"their voxel-to-world affines differ by up to {shift:.3g} mm")
                + "; resample the channels onto one grid first (e.g. SimpleITK.Resample onto channel 0)."
            )
    array = np.stack([np.asarray(v.array, dtype=np.result_type(*(v.array.dtype for v in volumes)))
                      for v in volumes])
    return Volume(array=array, spacing=first.spacing, affine=first.affine, source=first.source)


def _check_channel_arg(channel) -> None:
    if channel == ALL_CHANNELS:
        return
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or channel < 0:
        raise UsageError(f"channel must be a whole number >= 0 or {ALL_CHANNELS!r}, got {channel!r}")


def _pick_channel(path: Path, shape: tuple, channel) -> int | None:
    """The 4th-axis index to read (None: the image as it is), after checking it exists."""
    channels = shape[3] if len(shape) == 4 else 1
    if channel is None or channel == ALL_CHANNELS:
        return None
    if not 0 <= channel < channels:
        raise VolumeReadError(
            f"{path}: image has shape {tuple(shape)}, so channel {channel} does not exist "
            f"(channels 0..{channels - 1} on the 4th axis)."
        )
    return None if len(shape) == 3 else int(channel)


def _one_volume(array: np.ndarray, path: Path, shape: tuple, channel) -> np.ndarray:
    """(i, j, k) for one volume, (i, j, k, C) for ``channel="all"``; anything else is an error."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if channel == ALL_CHANNELS and array.ndim == 3:
        return array[..., None]
    if array.ndim == 3 or (channel == ALL_CHANNELS and array.ndim == 4):
        return array
    raise VolumeReadError(
        f"{path}: image has shape {tuple(shape)}, but a single 3-D volume is needed. "
        "For a 4-D image, pick one volume (channel=N, --channel N) or take them all as channels "
        "(channel='all', --channel all)."
    )


def max_voxels() -> int:
    """The largest volume a header may claim: ``$MED3D_MAX_VOXELS``, else 2^30 voxels."""
    raw = os.environ.get(MAX_VOXELS_ENV)
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{MAX_VOXELS_ENV}={raw!r} must be a positive whole number of voxels")
    return value


def _check_claim(path: Path, shape: tuple, dtype: np.dtype, *, data_file: Path | None, offset: int = 0,
                 compressed: bool = False) -> None:
    """Refuse a header whose shape and dtype the limit or the file's real size cannot hold, before any data is read.

    ``data_file`` None: the data may lie in other files (MetaImage, detached NRRD), only the limit is checked.
    """
    voxels = int(np.prod([int(n) for n in shape], dtype=object)) if shape else 1
    nbytes = voxels * int(dtype.itemsize)
    claim = f"its header claims {' x '.join(map(str, shape))} {dtype} ({nbytes / 1e9:.3g} GB)"
    limit = max_voxels()
    if voxels > limit:
        raise VolumeReadError(
            f"{path}: {claim}, more than the limit of {limit:,} voxels; if the scan really is that large, "
            f"raise {MAX_VOXELS_ENV}, or crop or downsample it first."
        )
    if data_file is None:
        return
    size = data_file.stat().st_size
    room = size * _DEFLATE_MAX_RATIO if compressed else size - offset
    if nbytes > room:
        raise VolumeReadError(
            f"{path}: {claim}, but the file holds {size:,} bytes"
            + (" (compressed data cannot expand that much)" if compressed else "")
            + ": the header is wrong or the file is truncated; re-export or re-download it."
        )


def _canonical(array: np.ndarray, affine: np.ndarray, path: Path) -> Volume:
    """Reorient ``array`` (any voxel order, with its voxel -> RAS+ ``affine``; a 4th axis: channels) to ([C,] D, H, W)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(linear)) < 1e-12:
        raise VolumeReadError(
            f"{path}: the voxel-to-world affine is singular or not finite, so the orientation "
            f"is unknown:\n{affine}\nFix the header (e.g. its sform/qform) and read it again."
        )
    ornt = io_orientation(affine)
    ras = apply_orientation(array, ornt)  # flips and transposes of the first 3 axes: a view, no copy yet
    ras_affine = affine @ inv_ornt_aff(ornt, array.shape[:3])
    # (i, j, k[, c]) -> ([c,] d, h, w); a no-op copy for Fortran-order NIfTI
    dhw = np.ascontiguousarray(ras.transpose(2, 1, 0) if ras.ndim == 3 else ras.transpose(3, 2, 1, 0))
    dhw_affine = ras_affine @ _DHW_TO_IJK
    spacing = tuple(float(s) for s in np.linalg.norm(dhw_affine[:3, :3], axis=0))
    return Volume(array=dhw, spacing=spacing, affine=dhw_affine, source=str(path))


def _read_nifti(path: Path, channel=None) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        image = nib.load(path)
        data_file = Path(image.file_map["image"].filename or path)
        _check_claim(
            path,
            tuple(image.header.get_data_shape()),
            np.dtype(image.header.get_data_dtype()),
            data_file=data_file,
            offset=int(getattr(image.header, "get_data_offset", lambda: 0)()),
            compressed=data_file.name.lower().endswith((".gz", ".bz2", ".zst")),
        )
        index = _pick_channel(path, tuple(image.shape), channel)
        dataobj = image.dataobj if index is None else image.dataobj[..., index]
        array = np.asanyarray(dataobj)  # applies scl_slope/inter, else keeps the dtype
    except VolumeReadError:
        raise
    except Exception as err:  # nibabel, gzip and zlib raise many types for a damaged file
        raise VolumeReadError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err}). "
            "Check that the file is complete and really NIfTI (re-export or re-download it)."
        ) from err
    return _one_volume(array, path, tuple(image.shape), channel), image.affine.astype(np.float64)


def _read_itk(path: Path, channel=None) -> tuple[np.ndarray, np.ndarray]:
    """An NRRD or MetaImage file through SimpleITK: voxels in (i, j, k[, c]) order and the voxel -> RAS+ affine.

    ITK's image index (i, j, k) maps to LPS+ mm by ``origin + direction @ diag(spacing) @ index``, as
    DICOM's does; numpy's view of it is (k, j, i). Vector images (several components per voxel)
    and 4-D images have their channels on the 4th axis, as a 4-D NIfTI has.
    """
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise VolumeReadError(
            f"{path}: reading NRRD and MetaImage files needs SimpleITK; pip install 'med3d-hub[io]'."
        ) from err
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size, components = tuple(reader.GetSize()), reader.GetNumberOfComponents()
        shape = size + ((components,) if components > 1 else ())
        probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), components)
        _check_claim(path, shape, sitk.GetArrayViewFromImage(probe).dtype, data_file=None)
        if len(size) not in (3, 4) or (len(size) == 4 and components > 1):
            raise VolumeReadError(
                f"{path}: a {len(size)}-D image of {components} component(s) per voxel, size {size}; "
                "a 3-D image (or a 4-D one, or one with a component per channel) is needed."
            )
        image = reader.Execute()
        array = sitk.GetArrayFromImage(image)  # (k, j, i[, c]) or, for 4-D, (t, k, j, i)
    except VolumeReadError:
        raise
    except Exception as err:  # SimpleITK raises RuntimeError for every file it cannot read
        raise VolumeReadError(
            f"{path}: not a readable NRRD or MetaImage file ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}). "
            "Check that the file (and, for .mhd/.nhdr, its data file) is complete; re-export it."
        ) from err
    array = array.transpose(2, 1, 0, 3) if array.ndim == 4 and components > 1 else array.T
    index = _pick_channel(path, array.shape, channel)
    if index is not None:
        array = array[..., index]
    dim = len(size)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)[:3]
    lps[:3, 3] = np.array(image.GetOrigin(), dtype=np.float64)[:3]
    return _one_volume(array, path, array.shape, channel), _LPS_TO_RAS @ lps


def _read_npy(path: Path) -> Volume:
    """A bare array has no geometry: it is taken as canonical (D, H, W) at 1 mm."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = _npy_header(f, version)
            offset = f.tell()
        _check_claim(path, shape, dtype, data_file=path, offset=offset, compressed=False)
        array = np.load(path, allow_pickle=False)
    except VolumeReadError:
        raise
    except Exception as err:
        raise VolumeReadError(
            f"{path}: not a readable .npy array ({type(err).__name__}: {err}); "
            "save it with numpy.save(path, array)."
        ) from err
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        shape = getattr(array, "shape", None)
        raise VolumeReadError(
            f"{path}: array has shape {shape}, but a 3-D (D, H, W) array is needed."
        )
    return Volume(array=array, spacing=(1.0, 1.0, 1.0), affine=_DHW_TO_IJK.copy(), source=str(path))


def _npy_header(f, version: tuple[int, int]):
    """(shape, fortran_order, dtype) of an open .npy file, positioned after its magic string."""
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _read_dicom_series(folder: Path, series: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack one DICOM series into a (slice, row, column) array and its voxel -> RAS+ affine."""
    slices = _one_series(folder, series)
    orientation = _float_tag(slices[0], "ImageOrientationPatient", 6, folder)
    for ds in slices[1:]:
        if not np.allclose(_float_tag(ds, "ImageOrientationPatient", 6, folder), orientation, atol=1e-4):
            raise VolumeReadError(
                f"{folder}: the slices have different ImageOrientationPatient values (a "
                "localizer or several stacks?); keep only the slices of one 3-D volume."
            )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_float_tag(ds, "ImagePositionPatient", 3, folder) for ds in slices])
    order = np.argsort(positions @ normal)
    slices = [slices[i] for i in order]
    positions = positions[order]
    _check_even_spacing(positions @ normal, folder)

    row_spacing, col_spacing = _float_tag(slices[0], "PixelSpacing", 2, folder)
    step = (positions[-1] - positions[0]) / (len(slices) - 1)  # follows a gantry tilt, if any
    lps = np.eye(4)
    lps[:3, 0] = step  # axis 0: slice
    lps[:3, 1] = col_dir * row_spacing  # axis 1: row index moves down a column
    lps[:3, 2] = row_dir * col_spacing  # axis 2: column index moves along a row
    lps[:3, 3] = positions[0]
    return _stack_pixels(slices, folder), _LPS_TO_RAS @ lps


def dicom_series(folder: str | Path) -> list[tuple[str, Path]]:
    """The image series under ``folder`` (sub-folders included), as (SeriesInstanceUID, the deepest
    folder holding all its files), in the order of their first file."""
    return [(uid, Path(os.path.commonpath([str(Path(ds.filename).parent) for ds in slices])))
            for uid, slices in _series_of(Path(folder)).items()]


def _series_of(folder: Path) -> dict[str, list]:
    """SeriesInstanceUID -> the datasets of its image files under ``folder``; pixel data is read on first use."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series = defaultdict(list)
    files = sorted(Path(root) / name for root, _, names in os.walk(folder) for name in names)
    for file in files:
        try:
            ds = pydicom.dcmread(file, defer_size="64 KB")
        except InvalidDicomError:
            continue  # not DICOM (a README, .DS_Store, ...): a series folder may hold such files
        except Exception as err:
            raise VolumeReadError(
                f"{file}: a DICOM file that cannot be read ({type(err).__name__}: {err}); "
                "remove or replace it."
            ) from err
        if "PixelData" in ds:  # skips DICOMDIR and other files without an image
            series[str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>"))].append(ds)
    return series


def _one_series(folder: Path, uid: str | None = None) -> list:
    """The datasets of the single image series in ``folder`` (or of series ``uid``); anything else is an error."""
    series = _series_of(folder)
    if not series:
        raise VolumeReadError(
            f"{folder}: no DICOM image files found (sub-folders included); pass a folder holding the "
            "files of a series."
        )
    listing = "\n".join(
        f"  {key}: {len(dss)} file(s), {dss[0].get('Modality', '?')} "
        f"'{dss[0].get('SeriesDescription', '')}'"
        for key, dss in series.items()
    )
    if uid is not None and uid not in series:
        raise VolumeReadError(
            f"{folder}: holds no DICOM series {uid}; pick one of its series (SeriesInstanceUID):\n{listing}"
        )
    if uid is None and len(series) > 1:
        raise VolumeReadError(
            f"{folder}: holds {len(series)} DICOM series; pick one with series=UID (--series UID), or read each "
            "(med3d features and predict do; in Python, med3d_hub.data.inputs.expand_inputs lists them). "
            f"Series (SeriesInstanceUID):\n{listing}"
        )
    slices = series[uid] if uid is not None else next(iter(series.values()))
    if int(slices[0].get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeReadError(
            f"{folder}: multi-frame (enhanced) DICOM is not supported; convert the series to "
            "NIfTI first (e.g. with dcm2niix) and read the .nii.gz."
        )
    if len(slices) < 2:
        raise VolumeReadError(
            f"{folder}: the series has a single slice, which is not a 3-D volume."
        )
    return slices


def _check_even_spacing(along_normal: np.ndarray, folder: Path) -> None:
    """Reject gaps and repeats: a stack with uneven slices has no single voxel grid."""
    gaps = np.diff(along_normal)
    median = float(np.median(gaps))
    tolerance = max(0.01, 0.01 * median)
    if median <= tolerance or np.any(np.abs(gaps - median) > tolerance):
        found = sorted({round(float(g), 3) for g in gaps})
        raise VolumeReadError(
            f"{folder}: uneven slice spacing, gaps of {found} mm between consecutive slices "
            f"(tolerance {tolerance:.3g} mm). Slices are missing, repeated (several echoes or "
            "time points?) or the series has several stacks; export a complete single series, "
            "or resample it to a regular grid first."
        )


def _stack_pixels(slices: list, folder: Path) -> np.ndarray:
    """Pixels with RescaleSlope/Intercept applied: int16 when exact, else float32."""
    try:
        raw = np.stack([ds.pixel_array for ds in slices])
    except ValueError as err:  # np.stack on slices of different sizes
        raise VolumeReadError(f"{folder}: slices differ in size ({err}).") from err
    except Exception as err:  # compressed transfer syntax without a decoder, damaged data
        raise VolumeReadError(
            f"{folder}: cannot decode the pixel data ({type(err).__name__}: {err}). For "
            "compressed DICOM, install a pydicom decoder (e.g. pylibjpeg) or convert to NIfTI."
        ) from err
    if raw.ndim != 3:
        raise VolumeReadError(f"{folder}: expected single-frame grey-level slices, got {raw.shape[1:]}.")
    slope = np.array([float(ds.get("RescaleSlope", 1) or 1) for ds in slices])
    intercept = np.array([float(ds.get("RescaleIntercept", 0) or 0) for ds in slices])
    if np.all(slope == 1) and np.all(intercept == 0):
        return raw
    if np.all(slope == 1) and np.all(intercept == np.round(intercept)):
        shifted = raw.astype(np.int32) + intercept.astype(np.int32)[:, None, None]
        info = np.iinfo(np.int16)
        if shifted.min() >= info.min and shifted.max() <= info.max:
            return shifted.astype(np.int16)
    return (raw.astype(np.float32) * slope[:, None, None] + intercept[:, None, None]).astype(np.float32)


def _float_tag(ds, keyword: str, length: int, folder: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != length:
        raise VolumeReadError(
            f"{folder}: {Path(ds.filename).name} lacks a valid {keyword}, so the slice "
            "geometry is unknown; this reader needs image-plane DICOM (CT, MR, PET)."
        )
    return np.array([float(v) for v in value])
