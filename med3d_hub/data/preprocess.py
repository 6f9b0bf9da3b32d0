"""The input preprocessing that a set of pretrained weights expects, described as data.

Pretrained weights only transfer when the input looks like what they were trained on, so the
preprocessing is stored beside the weights in the manifest as a small dict and rebuilt here:

    {"spacing": null, "intensity": {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5},
     "crop_foreground": false, "size": null, "size_mode": "resize"}

``Preprocess`` applies the steps in a fixed order:

1. ``spacing`` (mm along D, H, W, or null to keep the input's): trilinear resampling.
2. ``crop_foreground``: ``true`` crops to the bounding box of the non-zero voxels, as upstream
   MedicalNet's demo does for skull-stripped MRI. CT backgrounds are about -1000 HU, not 0, so this
   is a no-op there unless the volume was masked. ``"blank_planes"`` instead drops every D-plane
   whose voxels all lie at or below the window's ``min`` (``window_scale`` or ``hu_window``), as
   HA-GAN's ``preprocess.py`` drops blank axial slices.
3. ``intensity``, one of
   ``percentile_zscore`` (``lower``, ``upper``): clip to the volume's own percentiles, then
   z-score with the volume's mean and std: the paper's co-training (0.5 - 99.5);
   ``nonzero_zscore``: z-score with the mean and std of voxels > 0, zero voxels stay 0
   (upstream's demo, without its train-time noise in the background);
   ``hu_window`` (``min``, ``max``): clip to a fixed CT window, then z-score like
   ``percentile_zscore``. The z-score, rather than mapping the window onto [0, 1], keeps the
   statistics the weights saw in co-training and only swaps per-volume bounds for fixed ones;
   ``zscore``: z-score with the whole volume's mean and unbiased (N - 1) std, as ``torch.std``
   (MONAI's ``medicalnet_intensity_normalisation``; medmetric's per-volume z-score);
   ``window_scale`` (``min``, ``max``): clip to a fixed window and map it linearly onto [-1, 1]
   (``np.interp``, HA-GAN);
   ``none``: values are passed through as float32.
   A constant volume has std 0; it is divided by 1 instead, so no NaN appears.
4. ``size`` ([D, H, W] or null) with ``size_mode``: ``resize`` interpolates (trilinear) to exactly
   that size; ``crop_pad`` centre-crops and zero-pads (0 is the mean after a z-score);
   ``resize_skimage`` is ``skimage.transform.resize(order=1, mode="constant", anti_aliasing=None)``
   done with scipy.ndimage (a Gaussian of sigma ``(factor - 1) / 2`` along the axes that shrink,
   then linear ``zoom`` on voxel centres; outside the volume the fill is -1 after ``window_scale``,
   else 0), as HA-GAN resizes to 256^3. It needs scipy.

The result is a float32 tensor of shape (1, D, H, W): the channel axis first, ready to batch. A
volume of several channels on one grid ((C, D, H, W), e.g. MRI modalities) gives (C, D, H, W): the
channels are resampled and resized alike, cropped to the box of the voxels non-zero in any channel,
and each is normalised with its own statistics. The work is done with torch and numpy on the CPU;
MONAI is not needed.

Memory: a volume is copied once, into float32 (not even that with ``apply(..., inplace=True)`` on a
float32 array nobody else holds); clipping and the z-score work in place, and the percentiles of
integer values (CT in HU, most MRI) come from a histogram rather than a sorted copy.
``apply`` also returns the ``Grid`` of the steps (shapes and crop box), which ``inference/geometry``
reverses to bring a prediction back onto the scan's grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from .io import Volume

__all__ = ["PAPER_PREPROCESS", "Grid", "Preprocess", "nonzero_box", "percentiles", "resampled_shape", "transforms_for"]

PAPER_PREPROCESS: dict = {
    "spacing": None,
    "intensity": {"method": "percentile_zscore", "lower": 0.5, "upper": 99.5},
    "crop_foreground": False,
    "size": None,
    "size_mode": "resize",
}

# method -> {parameter: default}; None marks a parameter without a default (required).
_INTENSITY_PARAMS: dict[str, dict[str, float | None]] = {
    "percentile_zscore": {"lower": 0.5, "upper": 99.5},
    "nonzero_zscore": {},
    "hu_window": {"min": None, "max": None},
    "zscore": {},
    "window_scale": {"min": None, "max": None},
    "none": {},
}
_SIZE_MODES = ("resize", "crop_pad", "resize_skimage")


def _paper_intensity() -> dict:
    return dict(PAPER_PREPROCESS["intensity"])


@dataclass(frozen=True)
class Grid:
    """The (D, H, W) shapes a volume took on its way through a ``Preprocess``."""

    canonical: tuple[int, int, int]  # as read
    resampled: tuple[int, int, int]  # after ``spacing``
    box: tuple[slice, slice, slice] | None  # the crop to the non-zero voxels, in the resampled grid
    network: tuple[int, int, int]  # what the network saw


@dataclass(frozen=True)
class Preprocess:
    """One preprocessing recipe; build it with ``from_dict`` from a manifest entry."""

    spacing: tuple[float, float, float] | None = None
    intensity: dict = field(default_factory=_paper_intensity)
    crop_foreground: bool | str = False
    size: tuple[int, int, int] | None = None
    size_mode: str = "resize"

    def __post_init__(self) -> None:
        # Normalise here so that direct construction, from_dict and replace all validate.
        set_ = object.__setattr__
        set_(self, "spacing", _triple(self.spacing, "spacing", float))
        set_(self, "size", _triple(self.size, "size", int))
        set_(self, "intensity", _check_intensity(self.intensity))
        if not (isinstance(self.crop_foreground, bool) or self.crop_foreground == "blank_planes"):
            raise UsageError(f"crop_foreground must be true, false or 'blank_planes', got {self.crop_foreground!r}.")
        if self.crop_foreground == "blank_planes" and "min" not in self.intensity:
            raise UsageError("crop_foreground 'blank_planes' drops the planes at or below the window's min: "
                             "it needs intensity window_scale or hu_window.")
        if self.size_mode not in _SIZE_MODES:
            raise UsageError(f"unknown size_mode {self.size_mode!r}; allowed: {', '.join(_SIZE_MODES)}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """Build from a manifest dict; missing keys take the defaults, unknown keys are errors."""
        if not isinstance(d, Mapping):
            raise UsageError(f"a preprocessing description must be a dict, got {type(d).__name__}.")
        _check_keys(d)
        return cls(**d)

    def to_dict(self) -> dict:
        """A JSON-ready dict that ``from_dict`` turns back into an equal ``Preprocess``."""
        return {
            "spacing": None if self.spacing is None else list(self.spacing),
            "intensity": dict(self.intensity),
            "crop_foreground": self.crop_foreground,
            "size": None if self.size is None else list(self.size),
            "size_mode": self.size_mode,
        }

    def replace(self, **overrides: Any) -> Preprocess:
        """A copy with some steps changed, e.g. ``p.replace(size=(64, 128, 128))``."""
        _check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def __call__(self, volume: Volume | np.ndarray) -> torch.Tensor:
        """Preprocess a ``Volume`` or a (D, H, W) array at 1 mm into a (1, D, H, W) float32 tensor
        (a (C, D, H, W) ``Volume`` into (C, D, H, W))."""
        return self.apply(volume)[0]

    def apply(self, volume: Volume | np.ndarray, *, inplace: bool = False) -> tuple[torch.Tensor, Grid]:
        """The (C, D, H, W) float32 tensor and the ``Grid`` of its steps.

        ``inplace``: the volume's array may be overwritten (a float32 array read for this call
        alone), which saves the copy into float32.
        """
        if isinstance(volume, Volume):
            array, spacing = volume.array, volume.spacing
        elif isinstance(volume, np.ndarray):
            array, spacing = volume, (1.0, 1.0, 1.0)
        else:
            raise TypeError(
                f"expected a med3d_hub.data.io.Volume or a numpy array, got {type(volume).__name__}; "
                "read files with med3d_hub.data.io.read_volume."
            )
        if not (array.ndim == 3 or (array.ndim == 4 and isinstance(volume, Volume))) or 0 in array.shape:
            raise UsageError(f"expected a non-empty 3-D (D, H, W) volume, got shape {array.shape}.")
        x = _float32(array, inplace)  # owned by us from here, so later steps work in place
        x = x[None] if x.ndim == 3 else x  # (C, D, H, W) from here on
        canonical = tuple(x.shape[1:])

        if self.spacing is not None:
            shape = resampled_shape(x.shape[1:], spacing, self.spacing)
            _check_resampled_size(len(x), shape, x.shape[1:], spacing, self.spacing, getattr(volume, "source", "the array"))
            x = _interpolate(x, shape)
        resampled = tuple(x.shape[1:])
        box = None
        if self.crop_foreground == "blank_planes":
            x = _drop_blank_planes(x, self.intensity["min"])
        elif self.crop_foreground:
            box = nonzero_box(x)
            if box is not None:
                x = x[(slice(None), *box)]
        for channel in x:  # each channel with its own statistics, in place
            out = _normalise(channel, self.intensity)
            if out.data_ptr() != channel.data_ptr():
                channel.copy_(out)
        if self.size is not None:
            if self.size_mode == "resize":
                x = _interpolate(x, self.size)
            elif self.size_mode == "resize_skimage":
                fill = -1.0 if self.intensity["method"] == "window_scale" else 0.0
                x = torch.stack([_resize_skimage(c, self.size, fill) for c in x])
            else:
                x = _crop_pad(x, self.size)
        return x.contiguous(), Grid(canonical, resampled, box, tuple(x.shape[1:]))


def transforms_for(model_or_cfg: Any = None, **overrides: Any) -> Preprocess:
    """The preprocessing that goes with a model or a config, with optional overrides.

    Accepts a model with a ``pretrained_cfg`` (its ``"preprocess"`` entry is used), a pretrained
    cfg dict holding a ``"preprocess"`` entry, a preprocessing dict, a ``Preprocess``, or None.
    Without preprocessing information the paper's co-training recipe (``PAPER_PREPROCESS``) is
    returned. ``overrides`` change single steps, e.g. ``transforms_for(model, size=None)``.
    """
    if isinstance(model_or_cfg, str):
        raise UsageError(
            f"transforms_for got the string {model_or_cfg!r}; pass the model itself, its "
            "pretrained_cfg or a preprocessing dict."
        )
    if isinstance(model_or_cfg, Preprocess):
        base = model_or_cfg
    elif isinstance(model_or_cfg, Mapping):
        spec = model_or_cfg.get("preprocess", model_or_cfg)
        base = Preprocess.from_dict(PAPER_PREPROCESS if spec is None else spec)
    else:
        cfg = getattr(model_or_cfg, "pretrained_cfg", None)
        spec = cfg.get("preprocess") if isinstance(cfg, Mapping) else getattr(cfg, "preprocess", None)
        base = Preprocess.from_dict(PAPER_PREPROCESS if spec is None else spec)
    return base.replace(**overrides) if overrides else base


def _check_keys(d: Mapping[str, Any]) -> None:
    allowed = [f.name for f in dataclasses.fields(Preprocess)]
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise UsageError(
            f"unknown preprocessing key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}."
        )


def _triple(value: Any, name: str, kind: type) -> tuple | None:
    """None, or three positive numbers (D, H, W) of type ``kind``."""
    if value is None:
        return None
    try:
        items = list(value)
        numbers = [kind(v) for v in items]
        ok = len(items) == 3 and all(
            not isinstance(v, bool) and n > 0 and n == v for v, n in zip(items, numbers)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        what = "positive integers" if kind is int else "positive numbers (mm)"
        raise UsageError(f"{name} must be null or three {what} for D, H, W; got {value!r}.")
    return tuple(numbers)


def _check_intensity(spec: Any) -> dict:
    """A complete intensity dict: the method plus every parameter, defaults filled in."""
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, Mapping) or "method" not in spec:
        raise UsageError(f"intensity must be a dict with a 'method' key, got {spec!r}.")
    method = spec["method"]
    if method not in _INTENSITY_PARAMS:
        raise UsageError(
            f"unknown intensity method {method!r}; allowed: {', '.join(_INTENSITY_PARAMS)}."
        )
    params = _INTENSITY_PARAMS[method]
    unknown = [k for k in spec if k != "method" and k not in params]
    if unknown:
        allowed = ", ".join(params) or "none"
        raise UsageError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for intensity method "
            f"{method!r}; allowed: {allowed}."
        )
    out: dict[str, Any] = {"method": method}
    for key, default in params.items():
        value = spec.get(key, default)
        if value is None:
            raise UsageError(f"intensity method {method!r} needs {key!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise UsageError(f"intensity {key!r} must be a finite number, got {value!r}.")
        out[key] = float(value)
    low, high = {"percentile_zscore": ("lower", "upper"), "hu_window": ("min", "max"),
                 "window_scale": ("min", "max")}.get(
        method, (None, None)
    )
    if low is not None and not out[low] < out[high]:
        raise UsageError(f"intensity {low!r} must be below {high!r}, got {out[low]} and {out[high]}.")
    if method == "percentile_zscore" and not (0 <= out["lower"] and out["upper"] <= 100):
        raise UsageError(f"percentiles must lie in [0, 100], got {out['lower']} and {out['upper']}.")
    return out


def resampled_shape(shape, spacing, target) -> tuple[int, int, int]:
    """The rule of ``spacing``: n voxels of s mm become n * s / t voxels of t mm (half up), at least one."""
    return tuple(max(1, int(n * s / t + 0.5)) for n, s, t in zip(shape, spacing, target))


def nonzero_box(x: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """The (D, H, W) bounding box of the voxels of (C, D, H, W) non-zero in any channel (``crop_foreground``);
    None if there are none."""
    mask = x[0] != 0 if len(x) == 1 else (x != 0).any(dim=0)
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        hits = mask
        for other in (2, 1, 0):  # one axis at a time: any() over several axes needs torch 2.2
            if other != axis:
                hits = hits.any(dim=other)
        hits = torch.nonzero(hits).flatten()
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def percentiles(values: np.ndarray, qs, *, max_bins: int = 1 << 22) -> np.ndarray:
    """``np.percentile(values, qs)`` (linear interpolation), without a sorted copy when the values are integers.

    Integer values (CT in HU, most MRI, even as float32) are counted in a histogram, slab by slab;
    the order statistics are read off its cumulative counts, exactly. Other values, or a range wider
    than ``max_bins``, take ``np.percentile``, which partitions a copy.
    """
    q = np.true_divide(np.asarray(qs, dtype=np.float64), 100)
    counts = _histogram(values, max_bins)
    if counts is None:
        return np.percentile(values, qs)
    low, hist = counts
    cumulative = np.cumsum(hist)
    index = (values.size - 1) * q  # numpy's "linear": the (n - 1) * q-th order statistic
    below = np.floor(index)
    gamma = index - below
    a = (low + np.searchsorted(cumulative, below, side="right")).astype(np.float64)
    b = (low + np.searchsorted(cumulative, np.minimum(below + 1, values.size - 1), side="right")).astype(np.float64)
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp, to the last bit


def _histogram(values: np.ndarray, max_bins: int) -> tuple[int, np.ndarray] | None:
    """(lowest value, counts from it) of integer ``values``, or None when they are not integers in a small range."""
    if values.size == 0 or values.ndim == 0:
        return None
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)) or high - low + 1 > max_bins or low != int(low):
        return None
    hist = np.zeros(int(high - low) + 1, np.int64)
    for slab in values.reshape(-1, *values.shape[-2:]) if values.ndim >= 2 else values[None]:
        whole = slab.astype(np.int64)
        if not np.issubdtype(slab.dtype, np.integer) and not np.array_equal(whole, slab):
            return None
        whole -= int(low)
        hist += np.bincount(whole.reshape(-1), minlength=hist.size)
    return int(low), hist


def _float32(array: np.ndarray, inplace: bool) -> torch.Tensor:
    """The volume as a C-ordered float32 tensor: the array itself when it may be overwritten, else one copy."""
    if inplace and array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable:
        return torch.from_numpy(array)
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))


# The largest volume the spacing step makes, all channels together: 1024^3 float32 voxels (4 GiB),
# several times any CT at 0.5 mm. Above it the spacing is almost always wrong (a header in cm, a
# --spacing meant for another scan).
MAX_RESAMPLED_VOXELS = 1024**3


def _check_resampled_size(channels: int, shape, before, spacing, target, source: str) -> None:
    """Refuse, before allocating, a resampling whose result would not fit in memory; say what it would take."""
    voxels = channels * int(np.prod(shape, dtype=np.float64))
    if voxels <= MAX_RESAMPLED_VOXELS:
        return
    per_channel = f" x {channels} channels" if channels > 1 else ""
    raise UsageError(
        f"{source}: resampling its {_by(before)} voxels of {_by(spacing)} mm to a spacing of {_by(target)} mm would "
        f"make {_by(shape)} voxels{per_channel}, {voxels * 4 / 2**30:,.1f} GiB of float32 (the limit is "
        f"{MAX_RESAMPLED_VOXELS * 4 / 2**30:g} GiB); check the scan's voxel size, or give a coarser --spacing "
        "(or --spacing none to keep the scan's own)"
    )


def _by(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _interpolate(x: torch.Tensor, shape) -> torch.Tensor:
    """(C, D, H, W) -> (C, *shape), trilinear."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    return F.interpolate(x[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


def _drop_blank_planes(x: torch.Tensor, floor: float) -> torch.Tensor:
    """Drop the D-planes of (C, D, H, W) whose voxels all lie at or below ``floor``; an all-blank volume is left whole."""
    keep = (x > floor).any(dim=3).any(dim=2).any(dim=0)
    return x[:, keep] if keep.any() else x


def _resize_skimage(x: torch.Tensor, size, fill: float) -> torch.Tensor:
    """skimage.transform.resize(order=1, mode="constant", cval=fill) of one (D, H, W) channel, with its
    default anti-aliasing."""
    if tuple(x.shape) == tuple(size):
        return x
    try:
        import scipy.ndimage as ndi
    except ImportError:
        raise UsageError("size_mode 'resize_skimage' is done with scipy: pip install scipy") from None
    array = x.numpy().astype(np.float64)
    factors = np.divide(array.shape, size)
    if (factors > 1).any():  # skimage smooths before shrinking along any axis
        array = ndi.gaussian_filter(array, np.maximum(0.0, (factors - 1) / 2), mode="grid-constant", cval=fill)
    # skimage's mode "constant" is scipy's "grid-constant": the fill also enters the edge voxels' interpolation
    out = ndi.zoom(array, 1.0 / factors, order=1, mode="grid-constant", cval=fill, grid_mode=True)
    low, high = min(float(x.min()), fill), max(float(x.max()), fill)
    return torch.from_numpy(np.clip(out, low, high).astype(np.float32))


def _crop_pad(x: torch.Tensor, size) -> torch.Tensor:
    """Centre-crop axes of (C, D, H, W) longer than ``size`` and zero-pad shorter ones (extra voxel at the end)."""
    crop, pad = [slice(None)], []
    for n, target in zip(x.shape[1:], size):
        start = max(0, (n - target) // 2)
        crop.append(slice(start, start + min(n, target)))
        before = max(0, (target - n) // 2)
        pad.append((before, max(0, target - n) - before))
    x = x[tuple(crop)]
    # F.pad lists (before, after) pairs from the last axis backwards.
    return F.pad(x, [p for pair in reversed(pad) for p in pair]) if any(map(any, pad)) else x


def _zscore_(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Z-score ``x`` in place with the mean and std of ``values``; std 0 divides by 1."""
    if values.numel() == 0:
        return x
    std, mean = torch.std_mean(values, correction=0)
    return x.sub_(mean).div_(std if std > 0 else 1.0)


def _normalise(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """The intensity step of one (D, H, W) channel, in place on ``x`` (ours: a copy or a view of one)."""
    method = spec["method"]
    if method == "percentile_zscore":
        low, high = percentiles(x.numpy(), [spec["lower"], spec["upper"]])
        x = x.clamp_(float(low), float(high))
        return _zscore_(x, x)
    if method == "hu_window":
        x = x.clamp_(spec["min"], spec["max"])
        return _zscore_(x, x)
    if method == "zscore":
        std, mean = torch.std_mean(x, correction=1) if x.numel() > 1 else (torch.tensor(0.0), x.mean())
        return x.sub_(mean).div_(std if std > 0 else 1.0)
    if method == "window_scale":
        low, high = spec["min"], spec["max"]
        return x.clamp_(low, high).sub_(low).mul_(2.0 / (high - low)).sub_(1.0)
    if method == "nonzero_zscore":
        zero = x == 0
        _zscore_(x, x[x > 0])
        return x.masked_fill_(zero, 0.0)
    return x
