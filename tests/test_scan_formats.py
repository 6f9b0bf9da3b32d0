"""The scans users bring: NRRD and MetaImage beside NIfTI, DICOM folders of several series, 4-D images
and cases of several channels, read alike by read_volume and by `med3d features`, `predict` and `fid`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")
sitk = pytest.importorskip("SimpleITK")

from scan_files import ROOT, manifest_entry, medicalnet_pth, write_dicom_series, write_manifest  # noqa: E402

from med3d_hub.cli.app import main as med3d  # noqa: E402
from med3d_hub.data.inputs import expand_inputs, read_case_table, read_input  # noqa: E402
from med3d_hub.data.io import Volume, VolumeReadError, dicom_series, read_channels, read_volume  # noqa: E402
from med3d_hub.data.preprocess import Preprocess  # noqa: E402

SMALL = ["--pretrained", "none", "--size", "16", "16", "16", "--device", "cpu", "-q"]
PREDICT = ["--window", "16", "16", "16", "--device", "cpu", "-q"]
UIDS = ("1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12", "1.2.826.0.1.3680043.8.498.13")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def oblique_affine() -> np.ndarray:
    """Voxel axes permuted and flipped, turned 12 degrees, anisotropic, shifted: nothing NIfTI and ITK share by luck."""
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    permutation = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permutation @ np.diag([1.5, 2.0, 3.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def write_itk(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """(i, j, k[, c]) data with a voxel -> RAS+ affine, written by SimpleITK (LPS+, numpy order k, j, i)."""
    vector = data.ndim == 4
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0, 3) if vector else data.T),
                                   isVector=vector)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    sitk.WriteImage(image, str(path))
    return path


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def scan(seed: int, shape=(18, 20, 16)) -> np.ndarray:
    """A blob brighter than its noisy background, a different one per seed."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre = rng.uniform(5, 11, 3)
    blob = (np.linalg.norm(grid - centre, axis=-1) < 5).astype(np.float32)
    return (100 * blob + 10 * rng.random(shape, dtype=np.float32)).astype(np.float32)


def csv_rows(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().strip().splitlines()[1:]
    return {line.split(",")[0]: np.array([float(v) for v in line.split(",")[1:]]) for line in lines}


# -- NRRD and MetaImage: the same orientation and affine as NIfTI -----------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_nrrd_and_metaimage_read_as_the_same_nifti(tmp_path, suffix):
    data = np.random.default_rng(0).integers(-1000, 1000, (7, 9, 11)).astype(np.int16)
    affine = oblique_affine()
    nifti = read_volume(write_nifti(tmp_path / "scan.nii.gz", data, affine))
    itk = read_volume(write_itk(tmp_path / f"scan{suffix}", data, affine))
    assert itk.array.dtype == np.int16
    np.testing.assert_array_equal(itk.array, nifti.array)
    np.testing.assert_allclose(itk.spacing, nifti.spacing, atol=1e-5)
    np.testing.assert_allclose(itk.affine, nifti.affine, atol=1e-4)  # NIfTI stores its sform in float32


def test_metaimage_voxels_are_where_itk_puts_them(tmp_path):
    """Each canonical voxel maps (volume.affine) to the RAS+ point ITK gives its index: the convention holds."""
    shape = (5, 6, 7)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)  # a value names its (i, j, k)
    path = write_itk(tmp_path / "scan.mha", data, oblique_affine())
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    n = volume.shape
    for d, h, w in [(0, 0, 0), (1, 2, 3), (n[0] // 2, 0, n[2] - 1), (n[0] - 1, n[1] - 1, n[2] - 1)]:
        index = np.unravel_index(int(volume.array[d, h, w]), shape)
        lps = np.array(image.TransformIndexToPhysicalPoint([int(i) for i in index]))
        np.testing.assert_allclose(volume.affine @ [d, h, w, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-6)
    # D runs inferior -> superior, H posterior -> anterior, W left -> right (the NIfTI convention).
    assert [int(np.argmax(np.abs(volume.affine[:3, axis]))) for axis in range(3)] == [2, 1, 0]
    assert all(volume.affine[2 - axis, axis] > 0 for axis in range(3))


def test_vector_images_and_4d_nifti_give_the_same_channels(tmp_path):
    channels = np.stack([scan(1), scan(2), scan(3)], axis=-1)  # (i, j, k, c)
    affine = oblique_affine()
    four = write_nifti(tmp_path / "mri.nii.gz", channels, affine)
    vector = write_itk(tmp_path / "mri.nrrd", channels, affine)
    single = read_volume(write_nifti(tmp_path / "t2.nii.gz", channels[..., 1], affine))
    for path in (four, vector):
        picked = read_volume(path, channel=1)
        np.testing.assert_array_equal(picked.array, single.array)
        np.testing.assert_allclose(picked.affine, single.affine, atol=1e-4)
        whole = read_volume(path, channel="all")
        assert whole.array.shape == (3, *single.shape) and whole.shape == single.shape and whole.channels == 3
        np.testing.assert_array_equal(whole.array[1], single.array)
        with pytest.raises(VolumeReadError, match="channel 3 does not exist"):
            read_volume(path, channel=3)
        with pytest.raises(VolumeReadError, match=r"--channel N.*--channel all"):
            read_volume(path)


def test_the_channels_of_a_case_share_one_grid(tmp_path):
    affine = oblique_affine()
    t1 = write_nifti(tmp_path / "t1.nii.gz", scan(1), affine)
    t2 = write_itk(tmp_path / "t2.mha", scan(2), affine)
    case = read_channels([t1, t2])
    assert case.array.shape == (2, *read_volume(t1).shape) and case.source == str(t1)
    np.testing.assert_array_equal(case.array[1], read_volume(t2).array)

    moved = affine.copy()
    moved[:3, 3] += [0.0, 0.0, 2.0]
    elsewhere = write_nifti(tmp_path / "t2_moved.nii.gz", scan(2), moved)
    smaller = write_nifti(tmp_path / "t2_small.nii.gz", scan(2, (18, 20, 15)), affine)
    for other, why in ((elsewhere, "affines differ by up to 2 mm"), (smaller, "shape")):
        with pytest.raises(VolumeReadError, match="channel 1 is on another voxel grid than channel 0") as info:
            read_channels([t1, other])
        assert str(other) in str(info.value) and why in str(info.value) and "Resample" in str(info.value)


def test_channels_are_preprocessed_alike_and_normalised_each(tmp_path):
    """Resampled and sized together, cropped to the box non-zero in any channel, each z-scored alone."""
    first, second = np.zeros((20, 22, 18), np.float32), np.zeros((20, 22, 18), np.float32)
    first[3:12, 4:15, 2:9] = scan(1)[:9, :11, :7]
    second[6:17, 8:20, 5:16] = 7 * scan(2)[:11, :12, :11]
    volume = Volume(np.stack([first, second]), (2.0, 1.5, 1.0), np.diag([1.0, 1.5, 2.0, 1.0]), "case")
    pre = Preprocess(spacing=(2.0, 2.0, 2.0), crop_foreground=True, intensity={"method": "nonzero_zscore"},
                     size=(8, 8, 8))
    out = pre(volume)
    assert out.shape == (2, 8, 8, 8)
    resampled = Preprocess(spacing=(2.0, 2.0, 2.0), intensity={"method": "none"})(volume)
    box = np.argwhere((resampled != 0).any(0).numpy())
    crop = tuple(slice(lo, hi + 1) for lo, hi in zip(box.min(0), box.max(0)))
    alone = Preprocess(intensity={"method": "nonzero_zscore"}, size=(8, 8, 8))
    for c in range(2):
        expected = alone(resampled[c][crop].numpy())[0]
        np.testing.assert_allclose(out[c].numpy(), expected.numpy(), atol=1e-5)
    # One channel is what it always was.
    np.testing.assert_array_equal(pre(Volume(first, volume.spacing, volume.affine, "one"))[0].numpy(),
                                  pre(Volume(first[None], volume.spacing, volume.affine, "one"))[0].numpy())


# -- DICOM folders of several series ------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """study/ct/ holds one series; study/mixed/ two series whose files lie in one folder."""
    root = tmp_path_factory.mktemp("study")
    affine = np.diag([0.9, 0.8, 2.0, 1.0])
    arrays = [np.rint(scan(s)).astype(np.int16) for s in (4, 5, 6)]
    alone = [write_dicom_series(root / "alone" / f"s{i}", a, affine, series_uid=u)
             for i, (a, u) in enumerate(zip(arrays, UIDS))]
    write_dicom_series(root / "study" / "ct", arrays[0], affine, series_uid=UIDS[0])
    for i in (1, 2):
        for file in alone[i].iterdir():
            (root / "study" / "mixed").mkdir(parents=True, exist_ok=True)
            (root / "study" / "mixed" / f"{i}_{file.name}").write_bytes(file.read_bytes())
    return {"root": root, "study": root / "study", "alone": alone}


def test_every_series_of_a_study_is_found_in_its_sub_folders(study):
    folder = study["study"]
    assert dicom_series(folder) == [(UIDS[0], folder / "ct"), (UIDS[1], folder / "mixed"), (UIDS[2], folder / "mixed")]
    items = expand_inputs([str(folder)])
    assert [item.name for item in items] == [f"{folder}/ct#{UIDS[0]}", f"{folder}/mixed#{UIDS[1]}",
                                             f"{folder}/mixed#{UIDS[2]}"]
    for item, alone in zip(items, study["alone"]):
        expected = read_volume(alone)
        volume = read_input(item)
        np.testing.assert_array_equal(volume.array, expected.array)
        np.testing.assert_allclose(volume.affine, expected.affine)

    again = expand_inputs([item.name for item in items])  # the names read the same series again
    assert [(item.name, item.series) for item in again] == [(item.name, item.series) for item in items]
    np.testing.assert_array_equal(read_input(again[1]).array, read_volume(study["alone"][1]).array)

    (picked,) = expand_inputs([str(folder)], series=UIDS[2])
    assert picked.name == f"{folder}#{UIDS[2]}"
    np.testing.assert_array_equal(read_input(picked).array, read_volume(study["alone"][2]).array)
    # A folder of one series, in a sub-folder, keeps its own name and reads as before.
    (one,) = expand_inputs([str(study["root"] / "alone" / "s0")])
    assert one.name == str(study["root"] / "alone" / "s0")

    with pytest.raises(VolumeReadError, match=r"holds 3 DICOM series; pick one with series=UID \(--series UID\)"):
        read_volume(folder)
    with pytest.raises(VolumeReadError, match="holds no DICOM series 9.9") as info:
        read_volume(folder, series="9.9")
    assert all(uid in str(info.value) for uid in UIDS)


# -- the commands ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict:
    """t1/t2 of one case as 3-D files, the same as one 4-D NIfTI, and t1 as NRRD and MetaImage."""
    root = tmp_path_factory.mktemp("scans")
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    affine[:3, 3] = [-12.0, 4.0, 30.0]
    t1, t2 = scan(7), scan(8)
    files = {"root": root, "t1": write_nifti(root / "t1.nii.gz", t1, affine),
             "t2": write_nifti(root / "t2.nii.gz", t2, affine),
             "four": write_nifti(root / "mri.nii.gz", np.stack([t1, t2], -1), affine),
             "nrrd": write_itk(root / "t1.nrrd", t1, affine), "mha": write_itk(root / "t1.mha", t1, affine)}
    shifted = affine.copy()
    shifted[:3, 3] += 3.0
    files["t2_elsewhere"] = write_nifti(root / "t2_elsewhere.nii.gz", t2, shifted)
    return files


@pytest.fixture(scope="module")
def seg_weights(tmp_path_factory) -> dict:
    """Segmentation weights with their head, of one and of two input channels (random, fixed seed)."""
    import safetensors.torch
    import torch

    from med3d_hub import create_model

    root = tmp_path_factory.mktemp("weights")
    out = {}
    for channels in (1, 2):
        torch.manual_seed(channels)
        model = create_model("resnet10", seg_classes=2, in_chans=channels)
        out[channels] = root / f"seg{channels}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out[channels]))
    return out


def test_features_and_predict_take_one_channel_of_a_4d_image(scans, seg_weights, tmp_path, capsys):
    out = tmp_path / "f.csv"
    assert med3d(["features", str(scans["four"]), "--channel", "1", *SMALL, "-o", str(out)]) == 0
    assert med3d(["features", str(scans["t2"]), *SMALL, "-o", str(tmp_path / "t2.csv")]) == 0
    (picked,), (alone,) = csv_rows(out).values(), csv_rows(tmp_path / "t2.csv").values()
    np.testing.assert_array_equal(picked, alone)
    assert med3d(["features", str(scans["four"]), *SMALL, "-o", str(out)]) == 1
    assert "--channel N" in capsys.readouterr().err

    masks = tmp_path / "masks"
    masks.mkdir()
    assert med3d(["predict", "--model", "resnet10", str(seg_weights[1]), str(scans["four"]), "--channel", "1",
                  "-o", str(masks), *PREDICT]) == 0
    picked_mask = np.asanyarray(nib.load(masks / "mri.nii.gz").dataobj)
    assert med3d(["predict", "--model", "resnet10", str(seg_weights[1]), str(scans["t2"]), "-o", str(masks),
                  *PREDICT]) == 0
    np.testing.assert_array_equal(picked_mask, np.asanyarray(nib.load(masks / "t2.nii.gz").dataobj))


def test_fid_takes_one_channel_of_4d_images(tmp_path):
    real, fake, real_t2, fake_t2 = (tmp_path / name for name in ("real", "fake", "real_t2", "fake_t2"))
    for folder in (real, fake, real_t2, fake_t2):
        folder.mkdir()
    for i in range(3):
        for folder, folder_t2, seed in ((real, real_t2, 10 + i), (fake, fake_t2, 20 + i)):
            t1, t2 = scan(seed), scan(seed + 100) * 3
            write_nifti(folder / f"{i}.nii.gz", np.stack([t1, t2], -1), np.eye(4))
            write_nifti(folder_t2 / f"{i}.nii.gz", t2, np.eye(4))
    scores = []
    for sets, extra in (((real, fake), ["--channel", "1"]), ((real_t2, fake_t2), [])):
        report = tmp_path / "scores.json"
        assert med3d(["fid", *map(str, sets), *extra, *SMALL, "--json", str(report)]) == 0
        scores.append(json.loads(report.read_text())["fid"])
    assert scores[0] == scores[1] and scores[0] > 0


def test_features_and_predict_give_each_series_of_a_folder(study, seg_weights, tmp_path):
    folder, out = study["study"], tmp_path / "series.csv"
    assert med3d(["features", str(folder), *SMALL, "-o", str(out)]) == 0
    rows = csv_rows(out)
    assert list(rows) == [f"{folder}/ct#{UIDS[0]}", f"{folder}/mixed#{UIDS[1]}", f"{folder}/mixed#{UIDS[2]}"]
    assert med3d(["features", *map(str, study["alone"]), *SMALL, "-o", str(tmp_path / "alone.csv")]) == 0
    for row, alone in zip(rows.values(), csv_rows(tmp_path / "alone.csv").values()):
        np.testing.assert_array_equal(row, alone)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(reversed(rows)) + "\n")  # the rows' names, as inputs again
    assert med3d(["features", "--inputs-from", str(listing), *SMALL, "-o", str(tmp_path / "again.csv")]) == 0
    again = csv_rows(tmp_path / "again.csv")
    assert list(again) == list(reversed(rows)) and all(np.array_equal(again[k], rows[k]) for k in rows)
    assert med3d(["features", str(folder), "--series", UIDS[1], *SMALL, "-o", str(out)]) == 0
    assert list(csv_rows(out)) == [f"{folder}#{UIDS[1]}"]
    np.testing.assert_array_equal(csv_rows(out)[f"{folder}#{UIDS[1]}"], rows[f"{folder}/mixed#{UIDS[1]}"])

    masks = tmp_path / "masks"
    masks.mkdir()
    assert med3d(["predict", "--model", "resnet10", str(seg_weights[1]), str(folder), "-o", str(masks), *PREDICT]) == 0
    assert sorted(p.name for p in masks.glob("*.nii.gz")) == [f"ct_{UIDS[0]}.nii.gz", f"mixed_{UIDS[1]}.nii.gz",
                                                             f"mixed_{UIDS[2]}.nii.gz"]
    for uid, alone in zip(UIDS, study["alone"]):
        mask = nib.load(next(masks.glob(f"*_{uid}.nii.gz")))
        assert mask.shape == tuple(reversed(read_volume(alone).shape))
        assert json.loads(next(masks.glob(f"*_{uid}.json")).read_text())["input"].endswith(f"#{uid}")


def test_nrrd_and_metaimage_scans_give_the_features_and_masks_of_nifti(scans, seg_weights, tmp_path):
    out = tmp_path / "f.csv"
    assert med3d(["features", str(scans["t1"]), str(scans["nrrd"]), str(scans["mha"]), *SMALL, "-o", str(out)]) == 0
    nifti, nrrd, mha = csv_rows(out).values()
    np.testing.assert_allclose(nrrd, nifti, atol=1e-6)
    np.testing.assert_allclose(mha, nifti, atol=1e-6)

    masks = tmp_path / "masks"
    masks.mkdir()
    assert med3d(["predict", "--model", "resnet10", str(seg_weights[1]), str(scans["t1"]), str(scans["mha"]),
                  "-o", str(masks), *PREDICT]) == 2  # t1.nii.gz and t1.mha would both write masks/t1.nii.gz
    for name in ("t1", "mha"):
        (masks / name).mkdir()
        assert med3d(["predict", "--model", "resnet10", str(seg_weights[1]), str(scans[name]),
                      "-o", str(masks / name), *PREDICT]) == 0
    from_nifti, from_mha = nib.load(masks / "t1" / "t1.nii.gz"), nib.load(masks / "mha" / "t1.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(from_mha.dataobj), np.asanyarray(from_nifti.dataobj))
    np.testing.assert_allclose(from_mha.affine, from_nifti.affine, atol=1e-5)  # a RAS+ scan: the same grid


def test_cases_of_several_channels(scans, seg_weights, tmp_path, capsys):
    """--channels, a CSV with a column per channel and a 4-D image with --channel all are one case alike."""
    table = scans["root"] / "cases.csv"
    table.write_text("name,t1,t2\ncase1,t1.nii.gz,t2.nii.gz\n")  # paths from the CSV's folder
    out = tmp_path / "cases.csv"
    assert med3d(["features", str(scans["four"]), "--channel", "all", "--channels", f"{scans['t1']},{scans['t2']}",
                  "--inputs-from", str(table), *SMALL, "-o", str(out)]) == 0
    rows = csv_rows(out)
    assert list(rows) == [str(scans["four"]), str(scans["t1"]), "case1"]
    whole, files, csv_case = rows.values()
    np.testing.assert_array_equal(files, whole)
    np.testing.assert_array_equal(csv_case, whole)
    assert med3d(["features", str(scans["t1"]), *SMALL, "-o", str(tmp_path / "t1.csv")]) == 0
    assert not np.allclose(next(iter(csv_rows(tmp_path / "t1.csv").values())), whole)  # two channels seen, not one

    assert med3d(["features", "--channels", f"{scans['t1']},{scans['t2_elsewhere']}", *SMALL,
                  "-o", str(tmp_path / "bad.csv")]) == 1
    err = capsys.readouterr().err
    assert "t2_elsewhere.nii.gz: channel 1 is on another voxel grid than channel 0" in err

    masks = tmp_path / "masks"
    masks.mkdir()
    assert med3d(["predict", "--model", "resnet10", str(seg_weights[2]), str(scans["four"]), "--channel", "all",
                  "--inputs-from", str(table), "-o", str(masks), *PREDICT]) == 0
    assert sorted(p.name for p in masks.glob("*.nii.gz")) == ["case1.nii.gz", "mri.nii.gz"]
    np.testing.assert_array_equal(np.asanyarray(nib.load(masks / "case1.nii.gz").dataobj),
                                  np.asanyarray(nib.load(masks / "mri.nii.gz").dataobj))
    assert nib.load(masks / "case1.nii.gz").shape == nib.load(scans["t1"]).shape
    assert med3d(["predict", "--model", "resnet10", str(seg_weights[2]), str(scans["t1"]), "-o", str(masks),
                  *PREDICT]) == 1
    assert "t1.nii.gz: 1 channel(s), but the model takes 2" in capsys.readouterr().err


def test_a_case_table_names_its_rows_and_its_bad_lines(tmp_path):
    (tmp_path / "cases").mkdir()
    table = tmp_path / "cases" / "list.csv"
    table.write_text("flair,t1\na/flair.nii.gz,a/t1.nii.gz\n\nb/flair.nii.gz,b/t1.nii.gz\n")
    items = read_case_table(table)
    assert [item.name for item in items] == [str(tmp_path / "cases" / "a" / "flair.nii.gz"),
                                             str(tmp_path / "cases" / "b" / "flair.nii.gz")]
    assert items[1].paths == (str(tmp_path / "cases" / "b" / "flair.nii.gz"), str(tmp_path / "cases" / "b" / "t1.nii.gz"))
    table.write_text("flair,t1\na/flair.nii.gz,a/t1.nii.gz\nb/flair.nii.gz\n")
    with pytest.raises(ValueError, match=r"list.csv, line 3: expected a file in each of the columns \['flair', 't1'\]"):
        read_case_table(table)


# -- the documented commands run as written ---------------------------------------------------------


def bash_block(path: Path, marker: str) -> list[str]:
    """The command lines of the ```bash block of ``path`` that contains ``marker``."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / path).read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return [line for line in block.splitlines() if line.strip()]


def run_lines(lines: list[str], cwd: Path, monkeypatch) -> None:
    """Each line as the shell runs it (comments dropped, globs expanded in ``cwd``), through `med3d`'s main."""
    import glob
    import shlex

    monkeypatch.chdir(cwd)
    for line in lines:
        words = shlex.split(line, comments=True)
        assert words[0] == "med3d", line
        args = [match for word in words[1:] for match in (sorted(glob.glob(word)) if "*" in word else [word])]
        assert med3d([*args, "-q"]) == 0, line


@pytest.fixture
def documented_files(tmp_path, hub_server, hf_cache, monkeypatch, seg_weights) -> Path:
    """The files the documented commands name, and small default weights for resnet10 from a local Hub."""
    data = medicalnet_pth(tmp_path / "resnet_10.pth").read_bytes()
    hub_server.add_file("med3d-test/MedicalNet-Resnet10", "resnet_10.pth", data)
    recipe = {"spacing": None, "intensity": {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5},
              "crop_foreground": False, "size": [16, 16, 16], "size_mode": "resize"}
    manifest = write_manifest(tmp_path / "weights.json", manifest_entry("testhub", data, recipe))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(manifest))
    work = tmp_path / "work"
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    for folder in ("mri", "real", "synthetic", "study", "masks"):
        (work / folder).mkdir(parents=True)
    for i in range(3):
        write_nifti(work / "mri" / f"case{i}.nii.gz", np.stack([scan(i), scan(i + 10)], -1), affine)
        write_nifti(work / "real" / f"r{i}.nii.gz", np.stack([scan(i + 20), scan(i + 30)], -1), affine)
        write_nifti(work / "synthetic" / f"s{i}.nii.gz", np.stack([scan(i + 40), scan(i + 50)], -1), affine)
    write_nifti(work / "t1.nii.gz", scan(60), affine)
    write_nifti(work / "t2.nii.gz", scan(61), affine)
    write_itk(work / "scan.nrrd", scan(62), affine)
    write_itk(work / "scan.mha", scan(63), affine)
    for uid, folder, seed in ((UIDS[0], "ct", 64), (UIDS[1], "mr", 65)):
        write_dicom_series(work / "study" / folder, np.rint(scan(seed)).astype(np.int16), affine, series_uid=uid)
    (work / "cases.csv").write_text("name,t1,t2\ncase1,t1.nii.gz,t2.nii.gz\n")
    (work / "seg2.safetensors").write_bytes(seg_weights[2].read_bytes())
    return work


def test_the_readme_and_docs_commands_for_scan_inputs_run_as_written(documented_files, monkeypatch):
    lines = bash_block(Path("README.md"), "--channel") + bash_block(Path("docs/inputs.md"), "--channel all")
    assert any("--series" in line for line in lines) and any(".nrrd" in line for line in lines)
    run_lines(lines, documented_files, monkeypatch)
    assert sorted(p.name for p in (documented_files / "masks").glob("*.nii.gz")) == [
        "case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert list(csv_rows(documented_files / "series.csv")) == [f"study/ct#{UIDS[0]}", f"study/mr#{UIDS[1]}"]

    (python,) = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "docs/inputs.md").read_text(), re.S)
                 if "expand_inputs" in b]
    namespace: dict = {}
    exec(compile(python, "docs/inputs.md", "exec"), namespace)
    assert [item.name for item in namespace["series"]] == [f"study/ct#{UIDS[0]}", f"study/mr#{UIDS[1]}"]
    assert namespace["both"].array.shape == (2, *namespace["t2"].shape) and namespace["emb"].shape == (1, 512)
