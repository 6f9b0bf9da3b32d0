"""Reading real volumes: the MNI152 template as NIfTI and as a DICOM series, pydicom's CT data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from med3d_hub.data.io import Volume, VolumeReadError, read_volume

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

# pydicom ships this 5-slice CT series (16 x 16 pixels, 2.5 mm apart) with its test files.
CT5N = Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/98892001/CT5N"
CT2 = Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/77654033/CT2"
ORIGIN = (-100.0, -120.0, 10.0)  # RAS+ mm of voxel (0, 0, 0) of the written DICOM series


@pytest.fixture(scope="module")
def template() -> tuple[np.ndarray, np.ndarray]:
    """The 2 mm MNI152 T1 template as integer values (0-255) on its RAS+ (i, j, k) grid."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=2)
    data = np.round(np.asarray(image.dataobj, dtype=np.float64) * 255).astype(np.int16)
    return data, image.affine.copy()


def canonical(data: np.ndarray) -> np.ndarray:
    """The (D, H, W) array read_volume must return for RAS+ (i, j, k) data."""
    return data.transpose(2, 1, 0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    spacing=(3.0, 1.5, 2.5),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
) -> Path:
    """Write canonical (D, H, W) values as axial DICOM slices, the usual way scanners store them.

    Rows run anterior -> posterior and columns right -> left (ImageOrientationPatient
    1\\0\\0\\0\\1\\0 in LPS), so the reader has to flip both in-plane axes. Files are named in a
    scrambled order so that sorting by position is exercised. Stored pixel = (hu - intercept) / slope.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n_d, n_h, n_w = hu.shape
    sd, sh, sw = spacing
    stored = np.round((hu.astype(np.float64) - intercept) / slope).astype(np.uint16)
    for d in np.random.default_rng(0).permutation(n_d):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, int(d) + 1
        # Pixel (row 0, column 0) is the most right-anterior voxel of slice d; DICOM wants LPS.
        right, anterior = ORIGIN[0] + (n_w - 1) * sw, ORIGIN[1] + (n_h - 1) * sh
        ds.ImagePositionPatient = [-right, -anterior, ORIGIN[2] + d * sd]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [sh, sw]  # [between rows, between columns]
        ds.SliceThickness = sd
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.Rows, ds.Columns = n_h, n_w
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(stored[d, ::-1, ::-1]).tobytes()
        ds.save_as(folder / f"slice_{(int(d) * 37) % 101:03d}.dcm", enforce_file_format=True)
    return folder


def dicom_affine(spacing=(3.0, 1.5, 2.5)) -> np.ndarray:
    """The (d, h, w) -> RAS+ affine of the series write_dicom_series writes."""
    sd, sh, sw = spacing
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = sd, sh, sw, 1
    affine[:3, 3] = ORIGIN
    return affine


# --- NIfTI -----------------------------------------------------------------------------------


def test_nifti_round_trip_is_canonical(tmp_path, template):
    data, affine = template
    volume = read_volume(write_nifti(tmp_path / "mni.nii.gz", data, affine))
    assert isinstance(volume, Volume)
    assert volume.array.dtype == np.int16
    assert volume.array.shape == (95, 117, 99)
    np.testing.assert_array_equal(volume.array, canonical(data))
    assert volume.spacing == (2.0, 2.0, 2.0)
    assert volume.source == str(tmp_path / "mni.nii.gz")
    # D points superior, H anterior, W right, and the affine maps voxels where the file says.
    np.testing.assert_allclose(volume.affine[:3, :3], [[0, 0, 2], [0, 2, 0], [2, 0, 0]])
    np.testing.assert_allclose(volume.affine @ [5, 6, 7, 1], affine @ [7, 6, 5, 1])


@pytest.mark.parametrize("axcodes", ["LAS", "PIL", "SRP"])
def test_nifti_orientation_is_undone(tmp_path, template, axcodes):
    """The same brain stored flipped or with permuted voxel axes reads back identically."""
    data, affine = template
    ras = nib.Nifti1Image(data, affine)
    turn = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(axcodes)
    )
    turned = ras.as_reoriented(turn)
    assert nib.aff2axcodes(turned.affine) == tuple(axcodes)
    nib.save(turned, tmp_path / "turned.nii")
    volume = read_volume(tmp_path / "turned.nii")
    np.testing.assert_array_equal(volume.array, canonical(data))
    np.testing.assert_allclose(volume.affine, read_volume(write_nifti(tmp_path / "ras.nii", data, affine)).affine)


def test_nifti_oblique_takes_closest_canonical_order(tmp_path, template):
    data, affine = template
    angle = np.deg2rad(10)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    volume = read_volume(write_nifti(tmp_path / "oblique.nii.gz", data, rotation @ affine))
    np.testing.assert_array_equal(volume.array, canonical(data))
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 2.0))


def test_nifti_singleton_fourth_axis_is_squeezed(tmp_path, template):
    data, affine = template
    volume = read_volume(write_nifti(tmp_path / "4d.nii.gz", data[..., None], affine))
    np.testing.assert_array_equal(volume.array, canonical(data))


# --- DICOM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hu(template) -> np.ndarray:
    """The template as CT-like values in (D, H, W) order."""
    return canonical(template[0]).astype(np.int16) * 4 - 1024


@pytest.fixture(scope="module")
def series(tmp_path_factory, hu) -> Path:
    return write_dicom_series(tmp_path_factory.mktemp("dicom") / "mni", hu)


def test_dicom_series_matches_nifti(tmp_path, series, hu):
    """A series and a NIfTI file of the same grid read to the same array, spacing and affine."""
    volume = read_volume(series)
    assert volume.array.dtype == np.int16  # slope 1 and an integer intercept: exact HU
    np.testing.assert_array_equal(volume.array, hu)
    assert volume.spacing == pytest.approx((3.0, 1.5, 2.5))
    np.testing.assert_allclose(volume.affine, dicom_affine(), atol=1e-6)

    ras_affine = dicom_affine() @ np.array(
        [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float
    )
    nifti = read_volume(write_nifti(tmp_path / "same.nii.gz", hu.transpose(2, 1, 0), ras_affine))
    np.testing.assert_array_equal(volume.array, nifti.array)
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-6)
    assert volume.spacing == pytest.approx(nifti.spacing)


def test_dicom_rescale_slope_gives_float(tmp_path, hu):
    folder = write_dicom_series(tmp_path / "sloped", hu[:6], slope=0.5, intercept=-1024.0)
    volume = read_volume(folder)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, hu[:6].astype(np.float32))


def test_pydicom_ct5n_series():
    volume = read_volume(CT5N)
    assert volume.array.shape == (5, 16, 16)
    assert volume.array.dtype == np.int16
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    # Slices are sorted inferior -> superior whatever the file names say.
    z = [volume.affine[2] @ [d, 0, 0, 1] for d in range(5)]
    np.testing.assert_allclose(z, [-1.2375, 1.2625, 3.7625, 6.2625, 8.7625], atol=1e-4)
    # Slope 1, intercept -1024 applied: the lowest slice (file "3353") at row 0, column 0.
    raw = pydicom.dcmread(CT5N / "3353").pixel_array
    assert volume.array[0, -1, -1] == raw[0, 0] - 1024


# --- errors ----------------------------------------------------------------------------------


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no_such_scan.nii.gz"):
        read_volume("/nonexistent/no_such_scan.nii.gz")


def test_mixed_series_folder(tmp_path):
    for file in list(CT5N.iterdir()) + [next(CT2.iterdir())]:
        shutil.copy(file, tmp_path / f"{file.parent.name}_{file.name}")
    with pytest.raises(VolumeReadError, match="2 DICOM series") as info:
        read_volume(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for folder in (CT5N, CT2):
        uid = pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
        assert uid in message


def test_uneven_slice_spacing(tmp_path, hu):
    folder = write_dicom_series(tmp_path / "gap", hu[:8])
    files = sorted(folder.iterdir(), key=lambda f: pydicom.dcmread(f).InstanceNumber)
    files[4].unlink()
    with pytest.raises(VolumeReadError, match="uneven slice spacing") as info:
        read_volume(folder)
    assert str(folder) in str(info.value)
    assert "[3.0, 6.0]" in str(info.value)


def test_slices_with_different_orientations():
    """pydicom's CT2N: two localizer images of one series, one sagittal and one coronal."""
    with pytest.raises(VolumeReadError, match="different ImageOrientationPatient") as info:
        read_volume(CT5N.parent / "CT2N")
    assert "CT2N" in str(info.value)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(VolumeReadError, match="no DICOM image files") as info:
        read_volume(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_broken_nifti(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VolumeReadError, match="not a readable NIfTI") as info:
        read_volume(path)
    assert "broken.nii.gz" in str(info.value)


def test_real_4d_nifti(tmp_path):
    path = write_nifti(tmp_path / "fmri.nii.gz", np.zeros((8, 9, 10, 3), np.float32), np.eye(4))
    with pytest.raises(VolumeReadError, match=r"\(8, 9, 10, 3\)") as info:
        read_volume(path)
    assert "fmri.nii.gz" in str(info.value)


def test_channel_of_4d_nifti(tmp_path, template):
    data, affine = template
    channels = np.stack([data, 2 * data, -data], axis=-1)
    path = write_nifti(tmp_path / "modalities.nii.gz", channels, affine)
    second = read_volume(path, channel=1)
    assert np.array_equal(second.array, canonical(2 * data))
    assert np.allclose(second.affine, read_volume(write_nifti(tmp_path / "one.nii.gz", data, affine)).affine)
    with pytest.raises(VolumeReadError, match=r"channel 3 does not exist \(channels 0..2"):
        read_volume(path, channel=3)
    np.save(tmp_path / "volume.npy", data)
    with pytest.raises(VolumeReadError, match="4-D NIfTI, NRRD and MetaImage images only"):
        read_volume(tmp_path / "volume.npy", channel=0)


def test_singular_affine(tmp_path):
    """A header whose sform squashes one axis gives no orientation to reorient by."""
    header = nib.Nifti1Header()
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = [2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]
    path = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None, header=header), path)
    with pytest.raises(VolumeReadError, match="singular") as info:
        read_volume(path)
    assert "flat.nii" in str(info.value)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "scan.vol"
    path.write_bytes(b"x")
    with pytest.raises(VolumeReadError, match="unknown file type") as info:
        read_volume(path)
    assert "NRRD" in str(info.value) and "MetaImage" in str(info.value)


def test_broken_metaimage(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(b"x")
    with pytest.raises(VolumeReadError, match="not a readable NRRD or MetaImage file") as info:
        read_volume(path)
    assert "scan.mha" in str(info.value)


# --- .npy ------------------------------------------------------------------------------------


def test_npy(tmp_path, hu):
    np.save(tmp_path / "vol.npy", hu)
    volume = read_volume(tmp_path / "vol.npy")
    np.testing.assert_array_equal(volume.array, hu)
    assert volume.spacing == (1.0, 1.0, 1.0)
    # Taken as canonical at 1 mm: D superior, H anterior, W right.
    np.testing.assert_array_equal(volume.affine[:3, :3], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])


def test_npy_not_3d(tmp_path):
    np.save(tmp_path / "slice.npy", np.zeros((4, 5)))
    with pytest.raises(VolumeReadError, match=r"slice.npy.*\(4, 5\)"):
        read_volume(tmp_path / "slice.npy")
