"""The published 3D FID conventions, each against an independent reimplementation of its public code.

The references below are written from the upstream steps (HA-GAN's preprocess.py and fid_score.py,
MONAI's medicalnet_intensity_normalisation / spatial_average_3d / FIDMetric, medmetric's
zscore_per_volume and extractor) with numpy, scipy, skimage and torch directly; they share with the
package only the network's forward (the same MedicalNet ResNet for every convention; its equality
to MedicalNet is tested in test_models.py). Weights: random with a fixed seed (`--pretrained none`),
because the real files cannot be downloaded here; the table names the real ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from med3d_hub.cli import app as cli
from med3d_hub.inference import metrics
from med3d_hub.inference.conventions import get_convention, list_conventions
from med3d_hub.inference.feature_scores import feature_provenance, fingerprint
from med3d_hub.inference.features import extract_features, load_features
from med3d_hub.weights.factory import create_model

scipy_linalg = pytest.importorskip("scipy.linalg")
skimage_transform = pytest.importorskip("skimage.transform")

LOW, HIGH = -1024.0, 600.0  # HA-GAN preprocess.py's thresholds


# -- the references ---------------------------------------------------------------------------------


def ha_gan_preprocess(img: np.ndarray, size=256) -> np.ndarray:
    """HA-GAN preprocess.py resize_img: NaN -> LOW, np.interp onto [-1, 1], blank axial planes out, skimage resize."""
    img = img.astype(np.float64).copy()
    img[np.isnan(img)] = LOW
    img = np.interp(img, [LOW, HIGH], [-1, 1])
    img = img[np.mean(img, (1, 2)) != -1, :, :]
    return skimage_transform.resize(img, (size, size, size), mode="constant", cval=-1)


def ha_gan_fid(act1: np.ndarray, act2: np.ndarray, eps: float = 1e-6) -> float:
    """HA-GAN fid_score.py: post_process (np.mean, np.cov rowvar=False) and calculate_frechet_distance."""
    mu1, sigma1 = np.mean(act1, axis=0), np.cov(act1, rowvar=False)
    mu2, sigma2 = np.mean(act2, axis=0), np.cov(act2, rowvar=False)
    diff = mu1 - mu2
    covmean = scipy_linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy_linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def small_n_fid(act1: np.ndarray, act2: np.ndarray) -> float:
    """The same Frechet distance for N << D, in the N-dimensional span of the centred features.

    tr((S1 S2)^1/2) = sum sqrt(eig(X1 X2^T X2 X1^T)) / sqrt((n1 - 1)(n2 - 1)) for centred rows X.
    """
    x1, x2 = act1 - act1.mean(0), act2 - act2.mean(0)
    cross = x1 @ x2.T
    values = np.linalg.eigvals(cross @ cross.T).real.clip(0, None)
    trace_sqrt = np.sqrt(values).sum() / np.sqrt((len(x1) - 1) * (len(x2) - 1))
    diff = act1.mean(0) - act2.mean(0)
    return float(diff @ diff + (x1**2).sum() / (len(x1) - 1) + (x2**2).sum() / (len(x2) - 1) - 2 * trace_sqrt)


def monai_normalisation(volume: torch.Tensor) -> torch.Tensor:
    """monai.losses.perceptual.medicalnet_intensity_normalisation."""
    return (volume - volume.mean()) / volume.std()


def medmetric_zscore(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """medmetric's README zscore_per_volume on (B, 1, D, H, W)."""
    dims = tuple(range(2, x.ndim))
    return (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True).clamp_min(eps)


def seeded(arch: str, seed: int = 0):
    """What `--pretrained none --seed 0` builds."""
    torch.manual_seed(seed)
    return create_model(arch, pretrained=False, num_classes=0).eval()


def layer4_mean(model, x: torch.Tensor) -> np.ndarray:
    """spatial_average_3d of the layer4 maps = AdaptiveAvgPool3d(1) + flatten (medmetric, HA-GAN's conv_seg)."""
    with torch.no_grad():
        fmap = model.forward_features(x)
    return F.adaptive_avg_pool3d(fmap, 1).flatten(1).double().numpy()


# -- the scans --------------------------------------------------------------------------------------


def ct_like(rng, shape, blank_planes=()) -> np.ndarray:
    """HU-like values with some axial (first-axis) planes below -1024 everywhere, as air outside a scan."""
    volume = rng.normal(-300, 400, shape).astype(np.float32)
    volume[list(blank_planes)] = -1100.0
    return volume


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two folders of .npy scans (taken as they are, at 1 mm: what a reference reading np.load sees)."""
    root = tmp_path_factory.mktemp("conventions")
    rng = np.random.default_rng(0)
    shapes = [(18, 22, 26), (20, 20, 24), (16, 24, 22), (18, 24, 20)]
    for name, offset in (("real", 0.0), ("fake", 150.0)):
        (root / name).mkdir()
        for i, shape in enumerate(shapes):
            np.save(root / name / f"scan{i}.npy", ct_like(rng, shape, blank_planes=(0, shape[0] - 1)) + offset)
    return root


def files_of(folder) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.npy"))]


def scans_of(folder) -> list[np.ndarray]:
    return [np.load(p) for p in files_of(folder)]


def run(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- preprocessing at the full published recipe -------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 300, 64), (30, 200, 180)])
def test_ha_gan_preprocessing_is_its_preprocess_py(shape):
    """256^3 from a volume that shrinks along one axis (anti-aliasing) and grows along the others."""
    volume = ct_like(np.random.default_rng(1), shape, blank_planes=(0, 1, 7, shape[0] - 1))
    volume[3, :5, :5] = np.nan  # NaN -> the window's low end, as upstream
    ours = get_convention("ha-gan").preprocess_for()(np.nan_to_num(volume, nan=-2000.0))[0]
    reference = ha_gan_preprocess(volume)
    assert ours.shape == (256, 256, 256)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5, rtol=0)


def test_monai_and_medmetric_normalisation(sets):
    volume = scans_of(sets / "real")[0]
    for name, reference in (("monai-generative", monai_normalisation), ("monai-generative-r50", monai_normalisation),
                            ("medmetric", medmetric_zscore)):
        ours = get_convention(name).preprocess_for()(volume)
        expected = reference(torch.from_numpy(volume)[None, None].double())[0].float()
        assert ours.shape == expected.shape == (1, *volume.shape)  # no resizing
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# -- the estimator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [200, 12])
def test_sqrtm_estimator_is_ha_gan_and_monai_fid(n):
    """Well-conditioned (N > D) and singular (N < D) covariances."""
    monai_fid = pytest.importorskip("monai.metrics.fid")
    rng = np.random.default_rng(n)
    a = rng.gamma(2.0, 1.0, (n, 48))
    b = rng.gamma(2.2, 1.0, (n + 5, 48))
    ours = metrics.fid(a, b, estimator="sqrtm")
    assert ours == pytest.approx(ha_gan_fid(a, b), abs=1e-5, rel=1e-7)
    monai = float(monai_fid.get_fid_score(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours == pytest.approx(monai, abs=1e-5, rel=1e-7)


# -- features and scores end to end -----------------------------------------------------------------


def features_and_score(capsys, sets, tmp_path, convention, *extra):
    """`med3d features --convention` for both sets, then `med3d fid` of the two files."""
    for name in ("real", "fake"):
        code, text = run(capsys, "features", *files_of(sets / name), "--convention", convention, "--pretrained", "none",
                         "--seed", "0", "--device", "cpu", "-o", str(tmp_path / f"{name}.npz"), *extra)
        assert code == 0, text
    code, text = run(capsys, "fid", str(tmp_path / "real.npz"), str(tmp_path / "fake.npz"), "--json",
                     str(tmp_path / "score.json"), "--kid-subset-size", "4", "-q")
    assert code == 0, text
    saved = [load_features(tmp_path / f"{name}.npz") for name in ("real", "fake")]
    return saved, json.loads((tmp_path / "score.json").read_text())


def test_monai_generative_features_and_fid(sets, tmp_path, capsys):
    """Normalise the whole volume, resnet10 layer4, spatial_average_3d, MONAI's FIDMetric."""
    saved, report = features_and_score(capsys, sets, tmp_path, "monai-generative")
    model = seeded("resnet10")
    expected = []
    for name, got in zip(("real", "fake"), saved):
        ref = np.concatenate([
            layer4_mean(model, monai_normalisation(torch.from_numpy(v)[None, None])) for v in scans_of(sets / name)
        ])
        np.testing.assert_allclose(got.features, ref, atol=1e-5, rtol=0)
        expected.append(ref)
    monai_fid = pytest.importorskip("monai.metrics")
    reference = float(monai_fid.FIDMetric()(torch.from_numpy(expected[0]), torch.from_numpy(expected[1])))
    assert report["fid"] == pytest.approx(reference, abs=1e-5, rel=1e-6)
    assert report["fid_estimator"] == "sqrtm" and report["provenance"]["convention"] == "monai-generative"
    # the fingerprint: that of both files, with N per set
    prints = {fingerprint(s.provenance) for s in saved}
    assert prints == {s.provenance["fingerprint"] for s in saved} and len(prints) == 1
    assert report["fingerprint"] == fingerprint(saved[0].provenance, volumes=(4, 4)) != prints.pop()


def test_medmetric_features_through_the_python_api(sets):
    """medmetric's extractor on its README's z-score, via extract_features(convention=...)."""
    model = seeded("resnet50")
    volumes = scans_of(sets / "real")[:2]
    ours = extract_features(model, volumes, convention="medmetric", device="cpu")
    ref = np.concatenate([layer4_mean(model, medmetric_zscore(torch.from_numpy(v)[None, None])) for v in volumes])
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # the same computation as MONAI's ResNet-50 convention, hence the same fingerprint
    p = get_convention("medmetric").preprocess_for(model)
    prov = [feature_provenance(model, p, volumes=2, feature_dim=2048, convention=c) for c in ("medmetric", "monai-generative-r50")]
    assert prov[0]["fingerprint"] == prov[1]["fingerprint"]
    with pytest.raises(Exception, match="uses resnet50"):
        extract_features(seeded("resnet10"), volumes, convention="medmetric")


@pytest.mark.slow  # ~90 s: scipy's sqrtm of a 2048 x 2048 product, as HA-GAN takes it
def test_ha_gan_features_and_fid(sets, tmp_path, capsys):
    """HA-GAN's steps end to end; the network input is 32^3 here (256^3 is checked above) to keep the test short."""
    saved, report = features_and_score(capsys, sets, tmp_path, "ha-gan", "--size", "32")
    model = seeded("resnet50")
    expected = []
    for name, got in zip(("real", "fake"), saved):
        ref = np.concatenate([
            layer4_mean(model, torch.from_numpy(ha_gan_preprocess(v, 32)).float()[None, None]) for v in scans_of(sets / name)
        ])
        np.testing.assert_allclose(got.features, ref, atol=1e-5, rtol=0)
        expected.append(ref)
    assert report["fid"] == pytest.approx(small_n_fid(*expected), abs=1e-5, rel=1e-6)
    assert report["fid_estimator"] == "sqrtm" and report["provenance"]["input_size"] == [32, 32, 32]


# -- the table and the command line ---------------------------------------------------------------------


def test_every_convention_names_real_weights_and_a_source():
    names = [c.name for c in list_conventions()]
    assert {"med3d", "ha-gan", "monai-generative", "medmetric"} <= set(names)
    for c in list_conventions():
        assert c.source and c.computes
        if c.model:  # the real weights are a manifest entry with the sha256 the table states
            from med3d_hub.weights.manifest import find_entry

            entry = find_entry(c.model, c.pretrained)
            assert entry.sha256 in c.weights


def test_list_conventions(capsys):
    code, text = run(capsys, "fid", "--list-conventions")
    assert code == 0
    for c in list_conventions():
        assert f"{c.name}: {c.title}" in text and c.source in text


def test_files_of_different_conventions_are_refused_unless_forced(sets, tmp_path, capsys):
    for convention in ("monai-generative", "med3d"):
        code, text = run(capsys, "features", *files_of(sets / "real"), "--convention", convention, "--pretrained", "none",
                         "--size", "24", "--device", "cpu", "-q", "-o", str(tmp_path / f"{convention}.npz"))
        assert code == 0, text
    files = [str(tmp_path / "monai-generative.npz"), str(tmp_path / "med3d.npz")]
    code, text = run(capsys, "fid", *files, "--kid-subset-size", "4", "-q")
    assert code == 2 and "fingerprints" in text and "estimator: 'sqrtm' vs 'eigen'" in text
    code, text = run(capsys, "fid", *files, "--kid-subset-size", "4", "--force", "--json", str(tmp_path / "f.json"))
    assert code == 0, text
    assert json.loads((tmp_path / "f.json").read_text())["provenance_differences"][0].startswith("fingerprint:")
    code, text = run(capsys, "fid", *files[:1], files[0], "--convention", "ha-gan", "-q")
    assert code == 2 and "monai-generative convention, not ha-gan" in text
    code, text = run(capsys, "features", str(sets / "real"), "--convention", "ha-gan", "--model", "resnet10",
                     "-o", str(tmp_path / "x.npz"))
    assert code == 2 and "uses resnet50" in text
