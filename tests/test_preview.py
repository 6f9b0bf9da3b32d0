"""`med3d preview`: the mid-planes of the network input, written as a PNG and read back, for a NIfTI file
and a DICOM series, with the weights' recipe and with a FID convention's."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("pydicom")
pytest.importorskip("nilearn")
image = pytest.importorskip("matplotlib.image")

from scan_files import mni_template, write_dicom_series, write_nifti  # noqa: E402

from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.data.io import read_volume  # noqa: E402
from med3d_hub.inference import demo  # noqa: E402
from med3d_hub.inference.conventions import get_convention  # noqa: E402


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    data, affine = mni_template()
    write_nifti(root / "brain.nii.gz", data, affine)
    ct = (data.astype(np.int32) * 4 - 1000)[::2, ::2, ::2]  # HU-like: air -1000, tissue up to +20
    ct_affine = affine.copy()
    ct_affine[:3, :3] *= 2
    write_dicom_series(root / "series", ct, np.diag([4.0, 4.0, 4.0, 1.0]))
    return root


def run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("scan, options", [
    ("brain.nii.gz", ["--model", "resnet10"]),
    ("series", ["--convention", "ha-gan"]),
    ("series", ["--model", "resnet50.23datasets", "--size", "32"]),
])
def test_preview_writes_the_network_input(scans, tmp_path, capsys, scan, options):
    out = tmp_path / "preview.png"
    code, text = run(capsys, "preview", str(scans / scan), *options, "-o", str(out))
    assert code == 0, text
    assert f"wrote {out}" in text
    picture = image.imread(out)  # read back: a real PNG, one row of three planes
    assert picture.ndim == 3 and picture.shape[1] == 1300 and 400 <= picture.shape[0] <= 600
    gray = picture[..., :3].mean(axis=2)
    assert gray.std() > 0.05  # planes drawn, not a blank canvas


def test_the_planes_are_those_of_the_preprocessed_tensor(scans, tmp_path, monkeypatch):
    """What is drawn is the tensor Preprocess gives the network, here HA-GAN's 256^3 in [-1, 1]."""
    drawn = {}

    def capture(path, volume, activation, voxel_mm, title):
        drawn.update(volume=volume, activation=activation, voxel=voxel_mm, title=title)
        return path

    monkeypatch.setattr(demo, "save_picture", capture)
    preprocess = get_convention("ha-gan").preprocess_for()
    demo.preview_scan(scans / "series", preprocess, tmp_path / "p.png", "convention ha-gan")
    expected = preprocess(read_volume(scans / "series"))[0].numpy()
    np.testing.assert_array_equal(drawn["volume"], expected)
    assert drawn["activation"] is None
    assert "1 x 1 x 256 x 256 x 256" in drawn["title"] and "convention ha-gan" in drawn["title"]
    assert f"intensity {expected.min():.4g} .. {expected.max():.4g}" in drawn["title"]
    assert "window_scale (min -1024, max 600)" in drawn["title"]


def test_preview_refuses_a_non_png_output(scans, tmp_path, capsys):
    code, text = run(capsys, "preview", str(scans / "brain.nii.gz"), "-o", str(tmp_path / "p.jpg"))
    assert code == 2 and ".png" in text
