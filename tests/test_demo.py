"""`med3d demo`: the InVesalius reader, and the demo end to end through a test Hub, a local file,
random weights, and an unreachable Hub."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("nilearn")
pytest.importorskip("matplotlib")

from hub_server import HubServer  # noqa: E402
from scan_files import manifest_entry, med3d_env, medicalnet_pth, run_med3d, write_inv3, write_manifest  # noqa: E402
from skips import needs  # noqa: E402

from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.errors import EXIT_UNREACHABLE, EXIT_USAGE  # noqa: E402
from med3d_hub.data.io import VolumeReadError  # noqa: E402
from med3d_hub.inference import demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE = ["--size", "32", "64", "64"]


def head_phantom(slices=20, rows=40, cols=36) -> np.ndarray:
    """An int16 'CT' (slices, rows, columns): air, an ellipsoid head, a bright marker at column 0."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (slices, rows, cols)), indexing="ij")
    ct = np.where(x**2 + y**2 + (z * 0.8) ** 2 < 0.7, 40, -1000).astype(np.int16)
    ct[:, :, 0] = 1500
    return ct


@pytest.fixture(scope="module")
def inv3(tmp_path_factory):
    return write_inv3(tmp_path_factory.mktemp("inv3") / "head.inv3", head_phantom())


def assert_png(path) -> tuple:
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # a picture, not a blank page
    return image.shape


# -- the InVesalius reader ------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_inv3(tmp_path, compress):
    ct = head_phantom()
    volume = demo.read_inv3(write_inv3(tmp_path / "p.inv3", ct, spacing_xyz=(0.8, 0.7, 2.5), compress=compress))
    assert volume.shape == (20, 40, 36) and volume.array.dtype == np.int16
    assert volume.spacing == (2.5, 0.7, 0.8)  # D = slices, H = rows, W = columns
    # Columns are flipped so that W runs to the patient's left: the marker column ends up last.
    np.testing.assert_array_equal(volume.array, ct[:, :, ::-1])
    assert np.all(volume.array[:, :, -1] == 1500)
    np.testing.assert_allclose(volume.affine[:3, :3], [[0, 0, 0.8], [0, 0.7, 0], [2.5, 0, 0]])


def test_read_inv3_errors(tmp_path):
    ct = head_phantom()
    cases = {
        "no main.plist": dict(drop="main.plist"),
        "lacks the image data": dict(drop="matrix.dat"),
        "truncated or damaged": dict(truncate=10),
        "only axial": dict(plist_extra={"orientation": 3}),
        "spacing": dict(plist_extra={"spacing": [1.0, 1.0]}),
    }
    for message, options in cases.items():
        path = write_inv3(tmp_path / f"{len(message)}.inv3", ct, **options)
        with pytest.raises(VolumeReadError, match=message):
            demo.read_inv3(path)
    (tmp_path / "text.inv3").write_text("not a tar")
    with pytest.raises(VolumeReadError, match="not a readable InVesalius project"):
        demo.read_inv3(tmp_path / "text.inv3")
    with pytest.raises(FileNotFoundError):
        demo.read_inv3(tmp_path / "missing.inv3")


def test_read_the_real_cranium_ct():
    needs(demo.CRANIUM_INV3.is_file(), f"{demo.CRANIUM_INV3} (Debian's invesalius-examples)", "apt-get install invesalius-examples")
    volume = demo.read_inv3(demo.CRANIUM_INV3)
    assert volume.shape == (108, 256, 256) and volume.array.dtype == np.int16
    assert volume.spacing == pytest.approx((1.5, 0.9570312, 0.9570312))
    assert volume.array.min() == -1024 and volume.array.max() > 2000  # air and bone, in HU


# -- the demo end to end --------------------------------------------------------------------------


@pytest.mark.hub
def test_demo_through_the_test_hub(tmp_path, inv3):
    """Default weights from a Hub (the test server via HF_ENDPOINT) named by a private manifest."""
    data = medicalnet_pth(tmp_path / "resnet_10.pth").read_bytes()
    recipe = {"intensity": {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5}, "size": [24, 48, 48]}
    manifest = write_manifest(tmp_path / "private.json", manifest_entry("testhub", data, recipe))
    with HubServer() as server:
        server.add_file("med3d-test/MedicalNet-Resnet10", "resnet_10.pth", data)
        env = med3d_env(tmp_path, HF_ENDPOINT=server.endpoint, MED3D_HUB_MANIFEST=str(manifest))
        out = tmp_path / "out"
        run = run_med3d("demo", "--scan", "mni", "--scan", inv3, "--out-dir", out, env=env)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    for expected in ("Med3D resnet10 with resnet10.testhub", "hf://med3d-test/MedicalNet-Resnet10@main/resnet_10.pth",
                     "MNI152 T1 template", "189 x 233 x 197 voxels", "resize to 24 x 48 x 48", "1 x 1 x 24 x 48 x 48",
                     "layer4 map    512 x 3 x 6 x 6", "embedding     512-d, L2 norm", "cosine similarity"):
        assert expected in text, expected
    assert "RANDOM" not in text + run.stderr
    assert_png(out / "mni152_resnet10.png")
    assert_png(out / "head_resnet10.png")
    with np.load(out / "embeddings.npz") as z:
        assert list(z["files"]) == ["mni152", "head"] and z["features"].shape == (2, 512)
        assert np.abs(z["features"][0] - z["features"][1]).max() > 1e-3


def test_demo_with_a_local_weights_file(tmp_path):
    """--pretrained PATH needs no network: the endpoint here is a closed port."""
    weights = medicalnet_pth(tmp_path / "my_resnet_10.pth", seed=1)
    out = tmp_path / "pics"
    run = run_med3d("demo", "--pretrained", weights, "--scan", "mni", *SIZE, "--out-dir", out, env=med3d_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert str(weights) in run.stdout and "512-d" in run.stdout
    assert_png(out / "mni152_resnet10.png")


def test_demo_with_random_weights_says_so(tmp_path, capsys, monkeypatch, inv3):
    monkeypatch.setattr(demo, "CRANIUM_INV3", tmp_path / "not-installed.inv3")
    code = cli.main(["demo", "--pretrained", "none", *SIZE, "--out-dir", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "RANDOM" in err and "RANDOM WEIGHTS" in out
    assert "skipping the head CT" in out and "apt install invesalius-examples" in out
    assert_png(tmp_path / "o" / "mni152_resnet10.png")
    # A scan given by path, read by the InVesalius reader.
    assert cli.main(["demo", "-p", "none", "--scan", str(inv3), *SIZE, "--out-dir", str(tmp_path / "o"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert_png(tmp_path / "o" / "head_resnet10.png")


@pytest.mark.hub
def test_demo_without_a_hub_names_the_ways_out(tmp_path):
    run = run_med3d("demo", "--out-dir", tmp_path / "o", env=med3d_env(tmp_path), timeout=120)
    assert run.returncode == EXIT_UNREACHABLE, run.stderr
    err = run.stderr
    assert "Traceback" not in err
    assert err.startswith("med3d: error: the pretrained weights could not be fetched: could not reach")
    for way_out in ("HF_ENDPOINT=", "--pretrained /path/to/resnet_10.pth", "HF_HUB_OFFLINE=1", "med3d download", "--pretrained none"):
        assert way_out in err, way_out
    assert not (tmp_path / "o" / "mni152_resnet10.png").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_scan_with_nan_or_infinite_voxels_is_a_user_error(tmp_path, capsys, bad):
    """Such a scan is the user's to fix: one line, exit code 2, nothing written; not an internal error."""
    scan = head_phantom().astype(np.float32)
    scan[3, 4, 5] = bad
    np.save(tmp_path / "bad.npy", scan)
    out = tmp_path / "o"
    code = cli.main(["demo", "-p", "none", "--scan", str(tmp_path / "bad.npy"), *SIZE, "--out-dir", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "med3d: error: " in err and "1 of 28,800 voxels are NaN or infinite" in err and str(tmp_path / "bad.npy") in err
    assert "internal error" not in err and "Traceback" not in err
    assert not list(out.glob("*.png")) and not (out / "embeddings.npz").exists()


def test_the_demo_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "head.npy", head_phantom())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code = cli.main(["demo", "-p", "none", "--scan", str(tmp_path / "head.npy"), *SIZE, "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "matplotlib: pip install 'med3d-hub[demo]'" in err and "internal error" not in err
    assert not list((tmp_path / "o").glob("*.png"))
