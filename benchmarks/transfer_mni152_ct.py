"""Transfer on real scans, offline: co-train on MRI of one brain, fine-tune on a head CT of another person.

1. **Co-train** a ResNet-10 encoder with ``med3d_hub.train`` on two tasks built from nilearn's
   MNI152 scans (T1 brain mask; grey / white matter in a T2-like contrast): this is
   ``benchmarks/cotrain_mni152.py``, run as it is.
2. **Fine-tune** with ``med3d finetune seg`` (``python -m med3d_hub.finetune seg``) on a different
   task, subject and modality: brain (intracranial) segmentation on the InVesalius head CT that
   Debian's ``invesalius-examples`` ships (read with ``med3d_hub.demo.read_inv3``), twice with the
   same recipe and budget: from the co-trained encoder, and from scratch (``--pretrained none``).
3. **Compare** the two runs with ``med3d_hub.compare`` (what ``med3d compare`` prints and plots).

The CT's label is made by classical image processing, not by a person: soft tissue (-20..120 HU)
away from bone (> 200 HU, dilated by one voxel), eroded by 4 voxels, its largest connected
component, dilated back by 4 voxels inside the soft tissue, holes filled. It follows the inner
table of the skull closely on this scan (about 1.4 litres). Each CT case is the scan at 2 mm under
a random rigid + scale warp, resampled to a random voxel spacing (1.8-2.6 mm per axis), with
noise (10 HU): the variation the preprocessing and the network have to absorb. All CT cases come
from one head, so the held-out cases measure learning under these variations, not generalisation
to new people.

    OMP_NUM_THREADS=2 nice -n 19 python benchmarks/transfer_mni152_ct.py --work /tmp/med3d-transfer

Run again with the same ``--work`` to reuse what is there (the tasks, the co-trained encoder, any
finished fine-tuning). ``--encoder FILE`` skips step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cotrain_mni152 import rotation  # the same random warps as the co-training cases

HERE = Path(__file__).resolve().parent
CT_PROJECT = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def ct_brain_label(hu: np.ndarray) -> np.ndarray:
    """Intracranial soft tissue of a head CT (see the module docstring), as uint8 0/1."""
    import scipy.ndimage as ndi

    bone = ndi.binary_dilation(hu > 200, iterations=1)
    soft = (hu > -20) & (hu < 120) & ~bone
    core = ndi.binary_erosion(soft, iterations=4)
    components, n = ndi.label(core)
    if n == 0:
        raise RuntimeError("no soft tissue found: is this a head CT in HU?")
    sizes = ndi.sum(core, components, range(1, n + 1))
    brain = components == (1 + int(np.argmax(sizes)))
    brain = ndi.binary_dilation(brain, iterations=4) & soft
    return ndi.binary_fill_holes(brain).astype(np.uint8)


def make_ct_case(hu: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """One warped, resampled, noisy case of a 2 mm CT; returns image (HU), label, spacing (D, H, W)."""
    spacing = rng.uniform(1.8, 2.6, size=3)
    out_shape = [max(16, int(round(n * 2.0 / s))) for n, s in zip(hu.shape, spacing)]
    theta = torch.zeros(3, 4)
    theta[:, :3] = rotation(rng.uniform(-10, 10, size=3)).float() * float(rng.uniform(0.9, 1.1))
    theta[:, 3] = torch.from_numpy(rng.uniform(-0.06, 0.06, size=3)).float()
    grid = F.affine_grid(theta[None], [1, 1, *out_shape], align_corners=False)
    air = -1024.0
    src = torch.from_numpy(hu - air)[None, None]  # zero padding outside the scan is air
    image = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0] + air
    lab = F.grid_sample(torch.from_numpy(label)[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
    image = image + torch.from_numpy(rng.normal(0, 10.0, size=out_shape)).float()
    return image.numpy().astype(np.float32), lab.numpy().astype(np.uint8), tuple(float(s) for s in spacing)


def build_ct_task(work: Path, cases: int, seed: int) -> Path:
    from med3d_hub.demo import read_inv3
    from med3d_hub.train.synthetic import write_case, write_dataset_json

    folder = work / "Task85_HeadCTBrain"
    if (folder / "dataset.json").is_file():
        return folder
    volume = read_inv3(CT_PROJECT)
    hu = volume.array.astype(np.float32)
    label = ct_brain_label(hu)
    shape_2mm = [int(round(n * s / 2.0)) for n, s in zip(hu.shape, volume.spacing)]
    hu = F.interpolate(torch.from_numpy(hu)[None, None], size=shape_2mm, mode="trilinear", align_corners=False)[0, 0].numpy()
    label = F.interpolate(torch.from_numpy(label)[None, None].float(), size=shape_2mm, mode="nearest")[0, 0].numpy()
    rng = np.random.default_rng([seed, 85])
    ids = []
    for i in range(cases):
        image, lab, spacing = make_ct_case(hu, label.astype(np.uint8), rng)
        case_id = f"headct_{i:03d}"
        write_case(folder, case_id, image, lab, spacing)
        ids.append(case_id)
    write_dataset_json(folder, "HeadCTBrain", ["background", "brain"], ids, modality="CT",
                       description="InVesalius head CT (Cranium.inv3) with random warps; label: intracranial soft tissue "
                                   "by thresholds and morphology")
    return folder


def _run(command: list[str], log: Path) -> float:
    print("$ " + " ".join(command), flush=True)
    begin = time.time()
    with open(log, "a") as out:
        status = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if status:
        sys.exit(f"failed with exit status {status}; see {log}")
    return time.time() - begin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/med3d-transfer", help="folder for the tasks, caches and runs")
    p.add_argument("--encoder", help="a co-trained encoder.safetensors (skips the co-training)")
    p.add_argument("--cotrain-steps", type=int, default=600)
    p.add_argument("--cases", type=int, default=12, help="CT cases (a quarter are held out)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each run")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--model", default="resnet10")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not CT_PROJECT.is_file():
        sys.exit(f"{CT_PROJECT} not found: install Debian's invesalius-examples package")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    print(f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"load average {os.getloadavg()[0]:.2f}; logs in {log}", flush=True)
    timings = {}

    encoder = Path(args.encoder) if args.encoder else work / "cotrain" / "run" / "encoder.safetensors"
    if not encoder.is_file():
        if args.encoder:
            sys.exit(f"--encoder {encoder}: no such file")
        timings["cotrain_s"] = _run([sys.executable, str(HERE / "cotrain_mni152.py"), "--work", str(work / "cotrain"),
                                     "--steps", str(args.cotrain_steps), "--model", args.model, "--seed", str(args.seed),
                                     "--resume"], log)

    task = build_ct_task(work, args.cases, args.seed)
    runs = {"med3d": work / "ct-from-mni152", "scratch": work / "ct-scratch"}
    commands = {}
    for name, out in runs.items():
        commands[name] = [
            sys.executable, "-m", "med3d_hub.finetune", "seg", "--data", str(task), "--model", args.model,
            "--pretrained", str(encoder) if name == "med3d" else "none", "--steps", str(args.steps),
            "--crop", *[str(args.crop)] * 3, "--batch-size", "2", "--val-every", str(args.val_every),
            "--seed", str(args.seed), "--workers", "1", "--device", "cpu", "--cache-dir", str(work / "cache"),
            "--output", str(out), "--set", "val_fraction=0.25", "--set", "log_every=5", "--set", "keep_checkpoints=1",
            "--resume",
        ]
        if not (out / "finetuned.safetensors").is_file():
            timings[f"{name}_s"] = _run(commands[name], log)

    from med3d_hub.compare import compare_runs, format_table, plot_comparison

    labels = ["Med3D (co-trained on MNI152)", "from scratch"]
    tables = {}
    for target in (0.9, 0.98):
        metric, goal, curves = compare_runs(list(runs.values()), metric="dice_mean", target=target, labels=labels)
        tables[target] = format_table(metric, goal, curves, target)
        if target == 0.9:
            png = plot_comparison(metric, goal, curves, work / "compare.png")
            values = {c.label: dict(zip(c.steps, c.values)) for c in curves}
    print()
    for target, table in tables.items():
        print(table + "\n")
    steps = sorted(set().union(*(v.keys() for v in values.values())))
    print("| step | " + " | ".join(labels) + " |\n|---|---|---|")
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{values[n].get(s, float('nan')):.3f}" for n in labels) + " |")
    print(f"\ncurves: {png}; timings {timings}")
    (work / "summary.json").write_text(json.dumps(
        {"commands": commands, "timings_s": timings, "tables": {str(k): v for k, v in tables.items()},
         "dice": {n: {str(s): v for s, v in vals.items()} for n, vals in values.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
