"""Real-data check of the co-training: two MSD tasks built from nilearn's MNI152 scans, offline.

Task ``BrainMask`` (2 classes): the MNI152 T1 template with the brain mask as label.
Task ``Tissue`` (3 classes: background, grey matter, white matter): the same anatomy in a
T2-like contrast (dark white matter, bright CSF), labels from the grey/white-matter probability
maps (the larger one where it exceeds 0.5).

Each case is the 2 mm template under a random rigid + scale warp, resampled to a random voxel
spacing (1.8-2.6 mm per axis), with a smooth bias field, a random gamma, a random gain and offset,
and noise: the variation the preprocessing (median spacing, percentile clip, z-score) and the
network have to absorb. All cases come from one brain, so the held-out cases measure learning of
the mapping under these variations, not generalisation to new subjects.

    OMP_NUM_THREADS=1 python benchmarks/cotrain_mni152.py --work /tmp/mni152-cotrain

The script prints the training command it runs and a table of validation Dice per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from med3d_hub.training.metrics import read_metrics
from med3d_hub.training.synthetic import write_case, write_dataset_json


def _dhw(image) -> np.ndarray:
    """nilearn's (x, y, z) RAS array -> (D, H, W) = (z, y, x), as med3d_hub.data.io reads it."""
    return np.ascontiguousarray(np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0))


def load_sources() -> dict[str, np.ndarray]:
    from nilearn import datasets

    t1 = _dhw(datasets.load_mni152_template(resolution=2))
    gm = _dhw(datasets.load_mni152_gm_template(resolution=2))
    wm = _dhw(datasets.load_mni152_wm_template(resolution=2))
    brain = _dhw(datasets.load_mni152_brain_mask(resolution=2)) > 0
    tissue = np.zeros(t1.shape, np.uint8)
    tissue[(gm >= 0.5) & (gm >= wm)] = 1
    tissue[(wm >= 0.5) & (wm > gm)] = 2
    t1 = t1 / t1.max()
    head = t1 > 0.05
    t2_like = np.where(head, 1.1 - t1, 0.0).astype(np.float32)  # dark white matter, bright CSF
    return {"t1": t1, "t2": t2_like, "brain": brain.astype(np.uint8), "tissue": tissue}


def rotation(angles) -> torch.Tensor:
    a, b, c = (math.radians(v) for v in angles)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def make_case(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """One warped, resampled, intensity-distorted case; returns image, label, spacing (D, H, W)."""
    spacing = rng.uniform(1.8, 2.6, size=3)
    out_shape = [max(16, int(round(n * 2.0 / s))) for n, s in zip(image.shape, spacing)]
    theta = torch.zeros(3, 4)
    theta[:, :3] = rotation(rng.uniform(-10, 10, size=3)).float() * float(rng.uniform(0.9, 1.1))
    theta[:, 3] = torch.from_numpy(rng.uniform(-0.06, 0.06, size=3)).float()
    grid = F.affine_grid(theta[None], [1, 1, *out_shape], align_corners=False)
    src = torch.from_numpy(image)[None, None]
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]
    lab = F.grid_sample(torch.from_numpy(label)[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
    coarse = torch.from_numpy(rng.normal(0, 0.25, size=(1, 1, 4, 4, 4))).float()
    bias = torch.exp(F.interpolate(coarse, size=out_shape, mode="trilinear", align_corners=True))[0, 0]
    x = warped.clamp(min=0) ** float(rng.uniform(0.7, 1.4)) * bias
    x = x + torch.from_numpy(rng.normal(0, 0.03, size=out_shape)).float()
    x = x * float(rng.uniform(500, 1500)) + float(rng.uniform(-100, 100))
    return x.numpy().astype(np.float32), lab.numpy().astype(np.uint8), tuple(float(s) for s in spacing)


def build_tasks(work: Path, cases: int, seed: int) -> list[Path]:
    sources = load_sources()
    specs = [
        ("BrainMask", "t1", "brain", ["background", "brain"], "T1"),
        ("Tissue", "t2", "tissue", ["background", "grey_matter", "white_matter"], "T2-like"),
    ]
    folders = []
    for index, (name, image_key, label_key, labels, modality) in enumerate(specs):
        folder = work / f"Task8{index}_{name}"
        folders.append(folder)
        if (folder / "dataset.json").is_file():
            continue
        rng = np.random.default_rng([seed, index])
        ids = []
        for i in range(cases):
            image, label, spacing = make_case(sources[image_key], sources[label_key], rng)
            case_id = f"{name.lower()}_{i:03d}"
            write_case(folder, case_id, image, label, spacing)
            ids.append(case_id)
        write_dataset_json(folder, name, labels, ids, modality=modality,
                           description=f"MNI152 2009 (nilearn) {modality} with random warps; labels: {', '.join(labels)}")
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/mni152-cotrain", help="folder for the tasks, the cache and the run")
    p.add_argument("--cases", type=int, default=12, help="cases per task (a quarter are held out)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--model", default="resnet10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --work")
    args = p.parse_args(argv)

    work = Path(args.work)
    folders = build_tasks(work, args.cases, args.seed)
    command = [
        sys.executable, "-m", "med3d_hub.train", *[a for f in folders for a in ("--data", str(f))],
        "--model", args.model, "--steps", str(args.steps), "--crop", *[str(args.crop)] * 3,
        "--batch-size", "2", "--lr", str(args.lr), "--seed", str(args.seed), "--workers", "1",
        "--output", str(work / "run"), "--cache-dir", str(work / "cache"),
        "--set", "val_fraction=0.25", "--set", f"val_every={args.val_every}", "--set", "warmup_steps=20",
        "--set", f"checkpoint_every={args.val_every}", "--set", "log_every=10", "--set", "keep_checkpoints=1",
    ] + (["--resume"] if args.resume else [])
    print(f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print("$ " + " ".join(command), flush=True)
    begin = time.time()
    status = subprocess.call(command)
    if status:
        return status
    records = read_metrics(work / "run" / "metrics.jsonl")
    val = [r for r in records if r.get("kind") == "val"]
    train = [r for r in records if r.get("kind") == "train"]
    print(f"\nwall time {time.time() - begin:.0f} s; {len(train)} loss records, "
          f"mean samples/s {np.mean([r['samples_per_s'] for r in train if 'samples_per_s' in r]):.2f}")
    keys = ["dice/BrainMask", "dice/Tissue/grey_matter", "dice/Tissue/white_matter", "dice/Tissue", "dice_mean"]
    print("\n| step | " + " | ".join(k.removeprefix("dice/") for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in val:
        print(f"| {r['step']} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys) + " |")
    losses = [(r["step"], r["loss"]) for r in train]
    print("\ntraining loss (Dice + CE), every 50 steps: "
          + ", ".join(f"{s}: {v:.3f}" for s, v in losses if s % 50 == 0))
    (work / "summary.json").write_text(json.dumps({"command": command, "val": val}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
