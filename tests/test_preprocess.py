"""Preprocessing described as data: each step numerically, the dict form and transforms_for."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from med3d_hub.data.io import Volume, read_volume
from med3d_hub.errors import UsageError
from med3d_hub.data.preprocess import PAPER_PREPROCESS, Preprocess, transforms_for

NONE = {"method": "none"}


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Volume:
    """The 2 mm MNI152 T1 template, read back from a NIfTI file: (95, 117, 99) at 2 mm."""
    nib = pytest.importorskip("nibabel")
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=2)
    data = np.round(np.asarray(image.dataobj, dtype=np.float64) * 255).astype(np.int16)
    path = tmp_path_factory.mktemp("mni") / "mni.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return read_volume(path)


def zscore(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / a.std()


# --- intensity -------------------------------------------------------------------------------


def test_percentile_zscore(brain):
    out = Preprocess()(brain)  # the default is the paper's recipe
    assert out.shape == (1, 95, 117, 99) and out.dtype == torch.float32
    a = brain.array.astype(np.float64)
    low, high = np.percentile(a, [0.5, 99.5])
    expected = zscore(np.clip(a, low, high))
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-4)
    assert float(out.mean()) == pytest.approx(0, abs=1e-4)
    assert float(out.std(correction=0)) == pytest.approx(1, abs=1e-4)
    # Clipping: everything above the 99.5th percentile maps to the one top value.
    top = out[0].numpy()[a >= high]
    assert top.size > 0 and np.ptp(top) < 1e-5
    assert out.max() == pytest.approx(top[0])


def test_percentile_bounds_are_parameters(brain):
    wide = Preprocess(intensity={"method": "percentile_zscore", "lower": 0, "upper": 100})(brain)
    np.testing.assert_allclose(wide[0].numpy(), zscore(brain.array.astype(np.float64)), atol=1e-4)


def test_nonzero_zscore(brain):
    out = Preprocess(intensity={"method": "nonzero_zscore"})(brain)[0].numpy()
    a = brain.array.astype(np.float64)
    inside = a > 0
    assert 0 < inside.mean() < 1
    assert np.all(out[~inside] == 0)
    assert out[inside].mean() == pytest.approx(0, abs=1e-4)
    assert out[inside].std() == pytest.approx(1, abs=1e-4)
    np.testing.assert_allclose(out[inside], (a[inside] - a[inside].mean()) / a[inside].std(), atol=1e-4)


def test_hu_window(brain):
    hu = brain.array.astype(np.int16) * 8 - 1024  # about -1024 .. 1016
    out = Preprocess(intensity={"method": "hu_window", "min": -200, "max": 250})(hu)[0].numpy()
    expected = zscore(np.clip(hu.astype(np.float64), -200, 250))
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert np.ptp(out[hu <= -200]) < 1e-5 and np.ptp(out[hu >= 250]) < 1e-5


def test_none_copies_and_keeps_values():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = Preprocess(intensity=NONE)(a)
    np.testing.assert_array_equal(out[0].numpy(), a)
    out.zero_()
    assert a[1, 2, 3] == 23  # the input is never written to


@pytest.mark.parametrize(
    "intensity",
    [PAPER_PREPROCESS["intensity"], {"method": "nonzero_zscore"},
     {"method": "hu_window", "min": -100, "max": 100}, NONE],
)
def test_constant_volume_has_no_nan(intensity):
    out = Preprocess(intensity=intensity, crop_foreground=True, size=(4, 4, 4))(np.full((5, 6, 7), 7, np.int16))
    assert torch.isfinite(out).all()
    if intensity["method"] != "none":
        assert torch.all(out == 0)


def test_all_zero_volume():
    out = Preprocess(intensity={"method": "nonzero_zscore"}, crop_foreground=True)(np.zeros((3, 4, 5)))
    assert out.shape == (1, 3, 4, 5) and torch.all(out == 0)


# --- geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spacing", "shape"),
    [((4.0, 4.0, 4.0), (48, 59, 50)), ((2.0, 2.0, 2.0), (95, 117, 99)), ((1.5, 3.0, 2.5), (127, 78, 79))],
)
def test_resample_to_spacing(brain, spacing, shape):
    """n voxels of 2 mm become n * 2 / t voxels of t mm, rounded half up."""
    out = Preprocess(spacing=spacing, intensity=NONE)(brain)
    assert out.shape == (1, *shape)
    assert float(out.mean()) == pytest.approx(float(brain.array.mean()), rel=0.02)


def test_a_resampling_too_large_for_memory_is_refused_before_allocating():
    """40 mm voxels to 1 mm: the error says what would be allocated, not the allocator's own words."""
    coarse = Volume(np.ones((30, 60, 60), np.float32), (40.0, 40.0, 40.0), np.diag([40.0, 40.0, 40.0, 1.0]), "coarse.nii.gz")
    with pytest.raises(UsageError) as caught:
        Preprocess(spacing=(1.0, 1.0, 1.0), intensity=NONE)(coarse)
    message = str(caught.value)
    assert message.startswith("coarse.nii.gz: resampling its 30 x 60 x 60 voxels of 40 x 40 x 40 mm"), message
    assert "1200 x 2400 x 2400 voxels, 25.7 GiB of float32" in message and "--spacing" in message
    # A coarser target fits, and gives the shape the rule says.
    assert Preprocess(spacing=(10.0, 10.0, 10.0), intensity=NONE)(coarse).shape == (1, 120, 240, 240)


def test_ndarray_is_taken_at_1mm():
    out = Preprocess(spacing=(2, 2, 2), intensity=NONE)(np.ones((10, 20, 30)))
    assert out.shape == (1, 5, 10, 15)


def test_crop_foreground_bbox():
    a = np.zeros((10, 12, 14), np.float32)
    a[3:7, 2:9, 5] = 1.0
    a[4, 8, 5] = -3.0  # negative values are foreground too: the box is about non-zero
    out = Preprocess(crop_foreground=True, intensity=NONE)(a)
    assert out.shape == (1, 4, 7, 1)
    np.testing.assert_array_equal(out[0].numpy(), a[3:7, 2:9, 5:6])


def test_crop_foreground_before_intensity(brain):
    """The statistics are those of the cropped volume, as in upstream's demo."""
    out = Preprocess(crop_foreground=True)(brain)[0].numpy()
    a = brain.array.astype(np.float64)
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(a))
    assert out.shape == a[box].shape and out.shape != a.shape
    cropped = a[box]
    low, high = np.percentile(cropped, [0.5, 99.5])
    np.testing.assert_allclose(out, zscore(np.clip(cropped, low, high)), atol=1e-4)


def test_resize_exact_shape(brain):
    out = Preprocess(size=(56, 64, 48))(brain)
    assert out.shape == (1, 56, 64, 48) and out.dtype == torch.float32 and out.is_contiguous()


def test_crop_pad_centres(brain):
    """D 95 -> 100 pads 2 + 3, H 117 -> 100 crops from 8, W 99 -> 120 pads 10 + 11."""
    z = Preprocess(intensity=NONE)(brain)[0]
    out = Preprocess(intensity=NONE, size=(100, 100, 120), size_mode="crop_pad")(brain)[0]
    assert out.shape == (100, 100, 120)
    torch.testing.assert_close(out[2:97, :, 10:109], z[:, 8:108, :])
    assert out[:2].abs().sum() == 0 and out[97:].abs().sum() == 0
    assert out[:, :, :10].abs().sum() == 0 and out[:, :, 109:].abs().sum() == 0


def test_full_recipe_order(brain):
    """Resample, crop, normalise, then size: the manifest example end to end."""
    recipe = {
        "spacing": [3.0, 3.0, 3.0],
        "intensity": {"method": "nonzero_zscore"},
        "crop_foreground": True,
        "size": [56, 112, 112],
        "size_mode": "resize",
    }
    out = Preprocess.from_dict(recipe)(brain)
    assert out.shape == (1, 56, 112, 112) and torch.isfinite(out).all()


# --- bad input -------------------------------------------------------------------------------


def test_call_rejects_bad_input():
    with pytest.raises(ValueError, match=r"3-D.*\(4, 5\)"):
        Preprocess()(np.zeros((4, 5)))
    with pytest.raises(TypeError, match="read_volume"):
        Preprocess()([[[1.0]]])


# --- the dict form ---------------------------------------------------------------------------


def test_dict_round_trip_through_json():
    recipe = {
        "spacing": None,
        "intensity": {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5},
        "crop_foreground": True,
        "size": [56, 448, 448],
        "size_mode": "resize",
    }
    p = Preprocess.from_dict(recipe)
    assert p.size == (56, 448, 448) and p.crop_foreground is True
    assert p.to_dict() == recipe
    assert Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    hu = Preprocess(spacing=(1, 0.7, 0.7), intensity={"method": "hu_window", "min": -200, "max": 250})
    assert Preprocess.from_dict(json.loads(json.dumps(hu.to_dict()))) == hu
    assert hu.spacing == (1.0, 0.7, 0.7)


def test_defaults_are_the_paper_recipe():
    assert Preprocess().to_dict() == PAPER_PREPROCESS
    assert Preprocess.from_dict({}) == Preprocess.from_dict(PAPER_PREPROCESS)
    filled = Preprocess.from_dict({"intensity": {"method": "percentile_zscore"}})
    assert filled.intensity == {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5}
    assert Preprocess(intensity="none").intensity == NONE


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"spacingg": None}, r"unknown preprocessing key\(s\) 'spacingg'; allowed: spacing, intensity"),
        ({"intensity": {"method": "minmax"}}, "unknown intensity method 'minmax'; allowed: percentile_zscore"),
        ({"intensity": {"method": "nonzero_zscore", "lower": 1}}, r"unknown parameter\(s\) 'lower'.*allowed: none"),
        ({"intensity": {"method": "hu_window", "min": -200}}, "needs 'max'"),
        ({"intensity": {"method": "hu_window", "min": 250, "max": -200}}, "'min' must be below 'max'"),
        ({"intensity": {"method": "percentile_zscore", "upper": 101}}, r"\[0, 100\]"),
        ({"intensity": {"lower": 1}}, "'method' key"),
        ({"size": [56, 448]}, "size must be null or three positive integers"),
        ({"size": [56, 448, 44.5]}, "size must be"),
        ({"spacing": [1, 0, 1]}, "spacing must be null or three positive numbers"),
        ({"size_mode": "pad"}, "unknown size_mode 'pad'; allowed: resize, crop_pad"),
        ({"crop_foreground": "yes"}, "crop_foreground must be true, false or"),
    ],
)
def test_validation_errors(recipe, message):
    with pytest.raises(ValueError, match=message):
        Preprocess.from_dict(recipe)


def test_replace_overrides_and_validates():
    p = Preprocess.from_dict(PAPER_PREPROCESS)
    q = p.replace(size=(64, 64, 64), size_mode="crop_pad")
    assert q.size == (64, 64, 64) and q.size_mode == "crop_pad" and p.size is None
    with pytest.raises(ValueError, match="'sise'"):
        p.replace(sise=(1, 1, 1))


# --- transforms_for --------------------------------------------------------------------------

CT_RECIPE = {
    "spacing": [1.0, 1.0, 1.0],
    "intensity": {"method": "hu_window", "min": -200, "max": 250},
    "crop_foreground": False,
    "size": [56, 224, 224],
    "size_mode": "resize",
}


def test_transforms_for_model_with_pretrained_cfg():
    model = SimpleNamespace(pretrained_cfg={"hf_hub_id": "x/y", "preprocess": CT_RECIPE})
    assert transforms_for(model).to_dict() == CT_RECIPE
    small = transforms_for(model, size=(32, 64, 64), crop_foreground=True)
    assert small.size == (32, 64, 64) and small.crop_foreground and small.intensity["min"] == -200.0


def test_transforms_for_fallbacks_and_dicts():
    paper = Preprocess.from_dict(PAPER_PREPROCESS)
    assert transforms_for(torch.nn.Identity()) == paper  # no pretrained_cfg
    assert transforms_for(SimpleNamespace(pretrained_cfg=None)) == paper
    assert transforms_for(SimpleNamespace(pretrained_cfg={"hf_hub_id": "x/y"})) == paper
    assert transforms_for(None) == paper
    assert transforms_for({"preprocess": CT_RECIPE}).to_dict() == CT_RECIPE  # a pretrained cfg
    assert transforms_for(CT_RECIPE).to_dict() == CT_RECIPE  # a preprocessing dict
    assert transforms_for(paper, intensity="none").intensity == NONE
    with pytest.raises(ValueError, match="unknown intensity method"):
        transforms_for(None, intensity={"method": "clahe"})
    with pytest.raises(ValueError, match="pass the model itself"):
        transforms_for("resnet50")
