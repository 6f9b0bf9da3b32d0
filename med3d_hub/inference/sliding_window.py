"""Whole-volume inference of a patch network: overlapping windows, blended with Gaussian weights.

The same result as MONAI's ``sliding_window_inference(x, roi_size, sw_batch_size, net,
overlap=overlap, mode="gaussian")`` (tests compare the two), without MONAI, which only the
``train`` extra installs:

- a volume smaller than the window along an axis is zero-padded symmetrically to the window and the
  padding is cut off the result;
- windows start every ``int(roi * (1 - overlap))`` voxels (at least 1), the last one flush with the
  end, so every voxel is covered;
- each window's output is weighted by a Gaussian centred on the window (sigma = 0.125 x the window,
  peak 1, floored at its smallest value or 1e-3), so voxels near a window's border count less
  where windows overlap;
- the blended output is ``sum(w * out) / sum(w)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import product

import torch
import torch.nn.functional as F

__all__ = ["gaussian_weights", "sliding_window", "window_starts"]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (``size >= roi``)."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    starts, i = [], 0
    while True:
        start = i * interval
        starts.append(start - max(start + roi - size, 0))
        if start + roi >= size:
            return starts
        i += 1


def gaussian_weights(roi: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """The (D, H, W) weight of a window: a Gaussian peaked at its centre, floored above zero."""
    weights = torch.ones(())
    for n in roi:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0
        weights = weights.unsqueeze(-1) * torch.exp(x**2 / (-2 * (n * sigma_scale) ** 2))
    return weights.clamp(min=max(float(weights.min()), 1e-3))


def sliding_window(
    x: torch.Tensor,
    roi: Sequence[int],
    net: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 1,
    overlap: float = 0.25,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``net`` over windows of ``roi`` of ``x`` (N, C, D, H, W), blended into (N, K, D, H, W), float32.

    ``batch_size`` windows share a forward. ``progress(k)`` is called after each forward with the
    number of windows it covered.
    """
    if x.ndim != 5:
        raise ValueError(f"expected an (N, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    roi = [int(r) for r in roi]
    size = list(x.shape[2:])
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for r, n in zip(roi, size)]
    if any(a or b for a, b in pads):
        x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    padded = list(x.shape[2:])
    roi = [min(r, n) for r, n in zip(roi, padded)]
    weights = gaussian_weights(roi).to(x.device)
    corners = list(product(*(window_starts(n, r, overlap) for n, r in zip(padded, roi))))
    out = norm = None
    for n in range(x.shape[0]):
        for first in range(0, len(corners), batch_size):
            chunk = corners[first:first + batch_size]
            windows = [tuple(slice(s, s + r) for s, r in zip(c, roi)) for c in chunk]
            y = net(torch.cat([x[n:n + 1, :, w[0], w[1], w[2]] for w in windows])).float()
            if out is None:
                out = torch.zeros((x.shape[0], y.shape[1], *padded), device=x.device)
                norm = torch.zeros(padded, device=x.device)
                for w in corners:
                    norm[tuple(slice(s, s + r) for s, r in zip(w, roi))] += weights
            for w, yw in zip(windows, y):
                out[n, :, w[0], w[1], w[2]] += yw * weights
            if progress is not None:
                progress(len(chunk))
    out /= norm
    crop = tuple(slice(a, n - b) for (a, b), n in zip(pads, padded))
    return out[(slice(None), slice(None), *crop)]


def count_windows(size: Sequence[int], roi: Sequence[int], overlap: float = 0.25) -> int:
    """How many windows ``sliding_window`` runs over a volume of ``size``."""
    return math.prod(len(window_starts(max(n, r), r, overlap)) for n, r in zip(size, roi))
