"""Transfer on real scans, offline: co-train on MRI of one brain, fine-tune on a head CT of another person.

1. **Co-train** a ResNet-10 encoder with ``med3d_hub.train`` on two tasks built from nilearn's
   MNI152 scans (T1 brain mask; grey / white matter in a T2-like contrast): this is
   ``benchmarks/cotrain_mni152.py`` with ``--cotrain-steps`` steps.
2. **Fine-tune** with ``med3d finetune seg`` (``python -m med3d_hub.finetune seg``) on a different
   task, subject and modality: brain (intracranial) segmentation on the InVesalius head CT that
   Debian's ``invesalius-examples`` ships (read with ``med3d_hub.inference.demo.read_inv3``), with the same
   recipe and budget from the co-trained encoder and from scratch (``--pretrained none``), once per
   ``--seeds`` value (the seed of the fine-tuning: new layers, crops, augmentation). The arms
   alternate seed by seed, so a run cut short still has both arms.
3. **Summarise** the arms: mean and spread over seeds of the final Dice and of the steps to a common
   target Dice, a table of the mean curves, and a plot of the curves with their spread (``--plot``).

The CT's label is made by classical image processing, not by a person: soft tissue (-20..120 HU)
away from bone (> 200 HU, dilated by one voxel), eroded by 4 voxels, its largest connected
component, dilated back by 4 voxels inside the soft tissue, holes filled. It follows the inner
table of the skull closely on this scan (about 1.4 litres). Each CT case is the scan at 2 mm under
a random rigid + scale warp, resampled to a random voxel spacing (1.8-2.6 mm per axis), with
noise (10 HU): the variation the preprocessing and the network have to absorb. All CT cases come
from one head, so the held-out cases measure learning under these variations, not generalisation
to new people.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/transfer_mni152_ct.py --work /tmp/med3d-transfer

Run again with the same ``--work`` to reuse what is there (the tasks, the co-trained encoder, any
finished fine-tuning); ``--summary-only`` summarises the runs without starting any, unfinished
ones included, up to the last step that every run has validated.
``--encoder FILE`` skips step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    from med3d_hub.inference.demo import read_inv3
    from med3d_hub.training.synthetic import write_case, write_dataset_json

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


ARMS = {"pretrained": "from the co-trained encoder", "scratch": "from scratch"}


def _curve(run: Path) -> dict[int, float]:
    """Validation dice_mean per step of a finished run."""
    from med3d_hub.training.metrics import read_metrics

    return {r["step"]: r["dice_mean"] for r in read_metrics(run / "metrics.jsonl")
            if r.get("kind") == "val" and "dice_mean" in r}


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def summarise(curves: dict[str, dict[int, dict[int, float]]], target_fraction: float, plot: Path) -> dict:
    """Per arm: final Dice and steps to the common target (mean +- sample SD over seeds), mean curves, plot.

    The target is ``target_fraction`` x the better arm's mean final Dice. A run that never reaches it
    counts its last step (a lower bound) and is reported as not reached.
    """
    finals = {arm: [c[max(c)] for c in runs.values()] for arm, runs in curves.items()}
    target = target_fraction * max(statistics.mean(v) for v in finals.values() if v)
    rows, reached = {}, {}
    for arm, runs in curves.items():
        hits, missed = [], 0
        for c in runs.values():
            step = next((s for s in sorted(c) if c[s] >= target), None)
            missed += step is None
            hits.append(step if step is not None else max(c))
        rows[arm] = {"seeds": sorted(runs), "final_dice": finals[arm], "steps_to_target": hits, "not_reached": missed,
                     "final_dice_mean_sd": _mean_sd(finals[arm]),
                     "steps_to_target_mean_sd": _mean_sd([float(h) for h in hits], digits=1)}
    lines = [f"target Dice {target:.3f} ({target_fraction:g} x the better arm's mean final Dice)", "",
             "| arm | seeds | final Dice, mean +- SD | per seed | steps to target, mean +- SD | per seed |",
             "|---|---|---|---|---|---|"]
    for arm, row in rows.items():
        per_seed = ", ".join(f"{v:.3f}" for v in row["final_dice"])
        hits = ", ".join(str(h) + ("+" if h == max(c) and c[h] < target else "")
                         for h, c in zip(row["steps_to_target"], curves[arm].values()))
        lines.append(f"| {ARMS[arm]} | {len(row['seeds'])} | {row['final_dice_mean_sd']} | {per_seed} | "
                     f"{row['steps_to_target_mean_sd']} | {hits} |")
    steps = sorted(set().union(*(c.keys() for runs in curves.values() for c in runs.values())))
    lines += ["", "| step | " + " | ".join(f"{ARMS[a]}: mean (min-max)" for a in curves) + " |",
              "|---" * (len(curves) + 1) + "|"]
    for s in steps:
        cells = []
        for runs in curves.values():
            vals = [c[s] for c in runs.values() if s in c]
            cells.append(f"{statistics.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})" if vals else "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    _plot(curves, target, plot)
    return {"target": target, "arms": rows, "table": "\n".join(lines)}


def _plot(curves: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (arm, runs), colour in zip(curves.items(), ("tab:blue", "tab:orange")):
        steps = sorted(set.intersection(*(set(c) for c in runs.values())))
        vals = np.array([[c[s] for s in steps] for c in runs.values()])
        for row in vals:
            ax.plot(steps, row, color=colour, lw=0.6, alpha=0.35)
        ax.fill_between(steps, vals.min(0), vals.max(0), color=colour, alpha=0.15)
        ax.plot(steps, vals.mean(0), color=colour, lw=2, marker="o", ms=3,
                label=f"{ARMS[arm]} (mean of {len(runs)} seeds; band: min-max)")
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation Dice (held-out CT cases)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/med3d-transfer", help="folder for the tasks, caches and runs")
    p.add_argument("--encoder", help="a co-trained encoder.safetensors (skips the co-training)")
    p.add_argument("--cotrain-steps", type=int, default=400)
    p.add_argument("--cotrain-crop", type=int, default=32)
    p.add_argument("--cases", type=int, default=12, help="CT cases (a quarter are held out)")
    p.add_argument("--steps", type=int, default=80, help="fine-tuning steps of each run")
    p.add_argument("--decoder", default="conv_seg", help="paper (full resolution, slow on a CPU) or conv_seg")
    p.add_argument("--crop", type=int, default=24)
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--model", default="resnet10")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the co-training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds, one run per arm each")
    p.add_argument("--target", type=float, default=0.9, help="target = this x the better arm's mean final Dice")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                   help="run only these arms (e.g. one per process); the summary reads every finished run")
    p.add_argument("--plot", default=None, help="curves PNG (default: WORK/transfer-seeds.png)")
    p.add_argument("--summary-only", action="store_true", help="summarise the runs as they are; start none")
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
    if not encoder.is_file() and not args.summary_only and "pretrained" in args.arms:
        if args.encoder:
            sys.exit(f"--encoder {encoder}: no such file")
        # validation (whole volumes) only at the end: on a CPU it costs more than the steps between
        timings["cotrain_s"] = _run([sys.executable, str(HERE / "cotrain_mni152.py"), "--work", str(work / "cotrain"),
                                     "--steps", str(args.cotrain_steps), "--crop", str(args.cotrain_crop),
                                     "--val-every", str(args.cotrain_steps), "--model", args.model,
                                     "--seed", str(args.seed), "--resume"], log)

    task = build_ct_task(work, args.cases, args.seed)
    commands, finished = {}, {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            out = work / f"ct-{arm}-seed{seed}"
            commands[out.name] = [
                sys.executable, "-m", "med3d_hub.finetune", "seg", "--data", str(task), "--model", args.model,
                "--decoder", args.decoder, "--pretrained", str(encoder) if arm == "pretrained" else "none", "--steps", str(args.steps),
                "--crop", *[str(args.crop)] * 3, "--batch-size", "2", "--val-every", str(args.val_every),
                "--seed", str(seed), "--workers", "1", "--device", "cpu", "--cache-dir", str(work / "cache"),
                "--output", str(out), "--set", "val_fraction=0.25", "--set", "val_overlap=0", "--set", "log_every=5",
                "--set", "keep_checkpoints=1", "--resume", "--quiet",
            ]
            if arm in args.arms and not (out / "finetuned.safetensors").is_file() and not args.summary_only:
                timings[f"{out.name}_s"] = round(_run(commands[out.name], log))
                print(f"  {out.name}: {timings[f'{out.name}_s']} s", flush=True)
            curve = _curve(out) if (out / "metrics.jsonl").is_file() else {}
            if curve and ((out / "finetuned.safetensors").is_file() or args.summary_only):
                finished[arm][seed] = curve
    finished = {arm: runs for arm, runs in finished.items() if runs}
    if args.summary_only and finished:  # runs cut short: compare every run up to the last step all have validated
        last = min(max(c) for runs in finished.values() for c in runs.values())
        finished = {arm: {seed: {s: v for s, v in c.items() if s <= last} for seed, c in runs.items()}
                    for arm, runs in finished.items()}
    if len(finished) < 2:
        sys.exit("no finished run of one of the arms yet: nothing to compare")
    summary = summarise(finished, args.target, Path(args.plot) if args.plot else work / "transfer-seeds.png")
    print("\n" + summary["table"] + f"\n\ncurves: {args.plot or work / 'transfer-seeds.png'}; timings {timings}")
    (work / "summary.json").write_text(json.dumps(
        {"commands": commands, "timings_s": timings, "summary": summary,
         "dice": {arm: {str(seed): {str(s): v for s, v in c.items()} for seed, c in runs.items()}
                  for arm, runs in finished.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
