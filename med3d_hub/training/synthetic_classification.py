"""A synthetic classification set for tests and trials: ``.npy`` volumes and a ``path,label`` CSV.

Class 1 volumes hold a bright ellipsoid, class 0 volumes a dark one, both in noise with a random
gain and offset per volume: learnable in a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["make_synthetic_classification"]


def make_synthetic_classification(root: str | Path, num_cases: int = 12, shape: Sequence[int] = (20, 24, 20),
                                  seed: int = 0, split: bool = False) -> Path:
    """Write ``root/volumes/*.npy`` and ``root/labels.csv``; returns the CSV's path."""
    root = Path(root)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    lines = ["path,label" + (",split" if split else "")]
    for i in range(num_cases):
        label = i % 2
        centre = [rng.uniform(0.35 * n, 0.65 * n) for n in shape]
        radii = [rng.uniform(0.15 * n, 0.25 * n) for n in shape]
        blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0
        image = rng.normal(0.0, 0.2, size=tuple(shape)) + np.where(blob, 1.0 if label else -1.0, 0.0)
        image = (image * rng.uniform(50, 150) + rng.uniform(-50, 50)).astype(np.float32)
        name = f"volumes/case_{i:03d}.npy"
        np.save(root / name, image, allow_pickle=False)
        row = f"{name},{label}"
        if split:
            row += ",val" if i >= num_cases - max(2, num_cases // 4) else ",train"
        lines.append(row)
    csv = root / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv
