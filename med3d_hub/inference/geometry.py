"""From the network's grid back to the scan's own grid.

A prediction is made on the preprocessed volume: read into canonical (D, H, W) order
(``data/io.py``), resampled to the weights' spacing, perhaps cropped to its non-zero voxels and
resized or cropped/padded to a fixed size (``data/preprocess.py``). A mask is only useful next to
the scan, so every step is undone here, in reverse order:

1. ``size``: trilinear resize back, or the centre crop / zero pad reversed;
2. ``crop_foreground``: the crop is put back in the resampled volume; outside it is background;
3. ``spacing``: trilinear resampling back to the canonical grid of the scan;
4. orientation: the canonical (D, H, W) array is flipped and transposed back into the file's own
   voxel order, so that it has the file's shape and takes the file's affine unchanged.

Steps 1-3 work on per-class probabilities (N channels), so the arg-max is taken on the scan's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.io import Volume
from ..data.preprocess import Preprocess, nonzero_box
from ..errors import UsageError

__all__ = ["DHW_TO_IJK", "Grid", "from_canonical", "grid_of", "to_scan_grid"]

# canonical (d, h, w) -> RAS+ (i, j, k) voxel order is a reversal of the axes (data/io.py).
DHW_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@dataclass(frozen=True)
class Grid:
    """The shapes a volume took on its way through a ``Preprocess``."""

    canonical: tuple[int, int, int]  # as read (D, H, W)
    resampled: tuple[int, int, int]  # after ``spacing``
    box: tuple[slice, slice, slice] | None  # the crop to the non-zero voxels, in the resampled grid
    network: tuple[int, int, int]  # what the network saw


def grid_of(pre: Preprocess, volume: Volume, network_shape) -> Grid:
    """The shapes of ``volume`` after each step of ``pre`` (the crop box needs the resampled values)."""
    if pre.crop_foreground == "blank_planes" or pre.size_mode == "resize_skimage":
        raise UsageError("crop_foreground 'blank_planes' and size_mode 'resize_skimage' (FID conventions) cannot be "
                         "undone onto the scan's grid; predict with resize or crop_pad and a box crop")
    canonical = tuple(volume.shape)
    if pre.spacing is None:
        resampled = canonical
    else:  # the rule of Preprocess: n voxels of s mm become n * s / t voxels of t mm (half up)
        resampled = tuple(max(1, int(n * s / t + 0.5)) for n, s, t in zip(canonical, volume.spacing, pre.spacing))
    box = None
    if pre.crop_foreground:
        box = nonzero_box(Preprocess(spacing=pre.spacing, intensity={"method": "none"})(volume))  # as Preprocess crops
    return Grid(canonical, resampled, box, tuple(int(n) for n in network_shape))


def _resize(x: torch.Tensor, shape) -> torch.Tensor:
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    return F.interpolate(x[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


def _uncrop_pad(x: torch.Tensor, shape) -> torch.Tensor:
    """Reverse ``Preprocess``'s centre crop / zero pad of a (N, ...) map: back to ``shape``, background outside."""
    out = _background(x.shape[0], shape, x.dtype)
    src, dst = [], []
    for n, target in zip(shape, x.shape[1:]):
        crop_start = max(0, (n - target) // 2)  # where the crop began in the original
        pad_before = max(0, (target - n) // 2)  # where the original began in the padded
        length = min(n, target)
        dst.append(slice(crop_start, crop_start + length))
        src.append(slice(pad_before, pad_before + length))
    out[(slice(None), *dst)] = x[(slice(None), *src)]
    return out


def _background(channels: int, shape, dtype) -> torch.Tensor:
    out = torch.zeros((channels, *shape), dtype=dtype)
    out[0] = 1.0
    return out


def to_scan_grid(probabilities: torch.Tensor, pre: Preprocess, grid: Grid) -> torch.Tensor:
    """(N, network grid) class probabilities -> (N, D, H, W) on the scan's canonical grid."""
    x = probabilities
    cropped = grid.resampled if grid.box is None else tuple(s.stop - s.start for s in grid.box)
    if pre.size is not None:
        x = _resize(x, cropped) if pre.size_mode == "resize" else _uncrop_pad(x, cropped)
    if grid.box is not None:
        full = _background(x.shape[0], grid.resampled, x.dtype)
        full[(slice(None), *grid.box)] = x
        x = full
    return _resize(x, grid.canonical)


def from_canonical(array: np.ndarray, canonical_affine: np.ndarray, file_affine: np.ndarray,
                   file_shape) -> np.ndarray:
    """A (..., D, H, W) array on the canonical grid, in the file's voxel order (..., shape of the file).

    ``inv(canonical_affine) @ file_affine`` maps file voxels to canonical voxels; read_volume only
    flips and transposes, so it is a signed permutation, which is undone here exactly.
    """
    lead = array.ndim - 3
    mapping = np.linalg.inv(canonical_affine) @ file_affine
    linear = np.rint(mapping[:3, :3]).astype(int)
    if np.abs(mapping[:3, :3] - linear).max() > 1e-3 or sorted(np.abs(linear).sum(axis=0)) != [1, 1, 1]:
        raise ValueError("the scan's affine is not a flip/transpose of the canonical one; was it read with read_volume?")
    perm = [int(np.flatnonzero(linear[:, a])[0]) for a in range(3)]  # canonical axis of each file axis
    out = np.transpose(array, (*range(lead), *(lead + p for p in perm)))
    flips = [lead + a for a in range(3) if linear[perm[a], a] < 0]
    out = np.flip(out, axis=flips) if flips else out
    if tuple(out.shape[lead:]) != tuple(file_shape[:3]):
        raise ValueError(f"the mask has shape {out.shape[lead:]} in the file's order, the scan {tuple(file_shape[:3])}")
    return np.ascontiguousarray(out)

