"""`med3d fid` on real scans (the MNI152 brain and noisy copies) and on saved features: random weights
with a fixed seed, no network; provenance written, read back, and mismatches refused unless forced."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("nibabel")
pytest.importorskip("nilearn")
pytest.importorskip("pydicom")

from scan_files import mni_template, write_dicom_series, write_nifti  # noqa: E402

from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.cli.loading import model_preprocess  # noqa: E402
from med3d_hub.inference.feature_scores import features_of_scans, fingerprint, parameters_sha256  # noqa: E402
from med3d_hub.inference import metrics  # noqa: E402
from med3d_hub.inference.features import load_features, save_features  # noqa: E402
from med3d_hub.weights.factory import create_model  # noqa: E402

SMALL = ["--size", "24", "--pretrained", "none", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """real/: the MNI152 brain and three shifted copies; noisy/: the same four with strong noise."""
    root = tmp_path_factory.mktemp("fid")
    data, affine = mni_template()
    rng = np.random.default_rng(0)
    for folder in ("real", "noisy"):
        (root / folder).mkdir()
    for i, shift in enumerate((0, 3, -3, 6)):
        brain = np.roll(data, shift, axis=i % 3).astype(np.float32)
        write_nifti(root / "real" / f"brain{i}.nii.gz", brain, affine)
        noisy = brain + rng.normal(0, 40, brain.shape).astype(np.float32) * (brain > 0)
        write_nifti(root / "noisy" / f"brain{i}.nii.gz", noisy, affine)
    return root


def run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def seeded_model(seed: int = 0):
    """What `--pretrained none --seed 0` builds."""
    torch.manual_seed(seed)
    return create_model("resnet10", pretrained=False, num_classes=0)


def test_fid_from_scans_is_reproducible_and_records_its_provenance(scans, capsys, tmp_path):
    out = tmp_path / "scores.json"
    args = [str(scans / "real"), str(scans / "noisy"), *SMALL, "--seed", "0", "--kid-subset-size", "3",
            "--kid-subsets", "5", "--bootstrap", "5", "--json", str(out)]
    code, text = run(capsys, "fid", *args)
    assert code == 0, text
    report = json.loads(out.read_text())
    assert "4 volumes for 512 feature dimensions" in text  # the singular covariance is said out loud
    assert report["fid"] > 0 and report["kid"]["subsets"] == 5 and report["kid"]["subset_size"] == 3
    assert report["fid_ci"]["resamples"] == 5 and report["fid_ci"]["low"] <= report["fid_ci"]["high"]
    assert [s["volumes"] for s in report["sets"]] == [4, 4]
    prov = report["provenance"]
    assert prov["model"] == "resnet10" and prov["weights"] == "random (torch.manual_seed(0))"
    assert prov["parameters_sha256"] == parameters_sha256(seeded_model(0))
    assert prov["input_size"] == [24, 24, 24] and prov["preprocess"]["size"] == [24, 24, 24]
    assert prov["layer"] == "layer4" and prov["feature_dim"] == 512 and prov["precision"] == "fp32"
    assert report["command"].startswith("med3d fid ") and "--seed 0" in report["command"]
    # one hash of what changes the number, with N per set; the sets' own, without it
    assert prov["convention"] == "med3d" and report["fid_estimator"] == prov["estimator"] == "eigen"
    assert report["fingerprint"] == fingerprint(prov, volumes=(4, 4)) != fingerprint(prov)
    assert {s["fingerprint"] for s in report["sets"]} == {fingerprint(prov)}
    changed = dict(prov, input_size=[32, 32, 32])
    assert fingerprint(changed, volumes=(4, 4)) != report["fingerprint"]

    again = tmp_path / "again.json"
    assert run(capsys, "fid", *args[:-1], str(again))[0] == 0
    assert json.loads(again.read_text())["fid"] == report["fid"]


def test_saved_features_give_the_same_score_as_scans(scans, capsys, tmp_path):
    model = seeded_model(0)
    preprocess = model_preprocess(model, "resnet10", {"size": (24, 24, 24)})
    real = features_of_scans(model, sorted(str(p) for p in (scans / "real").iterdir()), preprocess, source="real", seed=0)
    noisy = features_of_scans(model, sorted(str(p) for p in (scans / "noisy").iterdir()), preprocess, source="noisy", seed=0)
    save_features(tmp_path / "real.npz", real.features, real.names, real.provenance)
    save_features(tmp_path / "noisy.npz", noisy.features, noisy.names, noisy.provenance)
    saved = load_features(tmp_path / "real.npz")
    assert saved.provenance == json.loads(json.dumps(real.provenance)) and saved.names == real.names
    np.testing.assert_array_equal(saved.features, real.features)

    with pytest.warns(metrics.SingularCovarianceWarning):
        expected = metrics.fid(real.features, noisy.features)
    code, text = run(capsys, "fid", str(tmp_path / "real.npz"), str(tmp_path / "noisy.npz"), "--json", "-", "-q")
    assert code == 0, text
    report, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])  # stdout; the warnings follow on stderr
    assert report["fid"] == pytest.approx(expected, rel=1e-12)
    # one saved set, one folder of scans: the provenance of the scans is computed and matches
    code, text = run(capsys, "fid", str(tmp_path / "real.npz"), str(scans / "noisy"), *SMALL, "--seed", "0",
                     "--json", str(tmp_path / "mixed.json"))
    assert code == 0, text
    assert json.loads((tmp_path / "mixed.json").read_text())["fid"] == pytest.approx(expected, rel=1e-5)


def test_features_made_differently_are_refused_unless_forced(scans, capsys, tmp_path):
    files = sorted(str(p) for p in (scans / "real").iterdir())
    code, text = run(capsys, "features", *files, "-o", str(tmp_path / "a.npz"), *SMALL)
    assert code == 0, text
    # another size and another seed of the random weights: two differences, both named
    code, text = run(capsys, "features", *files, "-o", str(tmp_path / "b.npz"), *SMALL[:1], "16", *SMALL[2:],
                     "--seed", "1")
    assert code == 0, text
    assert load_features(tmp_path / "a.npz").provenance["volumes"] == 4

    code, text = run(capsys, "fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert code == 2
    assert "not made the same way" in text and "input_size" in text and "parameters_sha256" in text and "--force" in text
    code, text = run(capsys, "fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--force",
                     "--json", str(tmp_path / "forced.json"))
    assert code == 0, text
    assert json.loads((tmp_path / "forced.json").read_text())["provenance_differences"]

    np.save(tmp_path / "bare.npy", load_features(tmp_path / "a.npz").features)
    code, text = run(capsys, "fid", str(tmp_path / "a.npz"), str(tmp_path / "bare.npy"))
    assert code == 2 and "no provenance" in text


def test_sets_from_two_folders_of_files_and_bad_input(scans, capsys, tmp_path):
    real = sorted(str(p) for p in (scans / "real").iterdir())
    noisy = sorted(str(p) for p in (scans / "noisy").iterdir())
    from med3d_hub.inference.feature_scores import expand_scans, split_sets

    data, affine = mni_template()
    write_nifti(tmp_path / "a.nii.gz", data, affine)
    write_dicom_series(tmp_path / "series", data, affine)  # a sub-folder holding one DICOM series is one scan
    (tmp_path / "README").write_text("not a scan")
    assert expand_scans([str(tmp_path)]) == [str(tmp_path / "a.nii.gz"), str(tmp_path / "series")]

    assert split_sets(real + noisy) == [real, noisy]
    with pytest.raises(ValueError, match="not 2"):
        split_sets(real + noisy + real[:1])
    code, text = run(capsys, "fid", real[0])
    assert code == 2 and "two sets" in text
    code, text = run(capsys, "fid", str(scans / "real"), str(scans / "noisy"), "--json", str(scans / "missing" / "s.json"))
    assert code == 2 and "does not exist" in text  # refused before any feature is computed
