"""A cohort through ``med3d features``: volumes/s against reading workers and against torchrun ranks.

Generated CT-like scans (NIfTI, uint16 with ``scl_slope``/``scl_inter``, gzip) go through the real
command, ``python -m med3d_hub features`` with ``--workers 1`` and ``2``, and ``torchrun
--nproc_per_node=1`` and ``2 -m med3d_hub.features``. Every process (each rank) reports:

- its wall time inside the command (volumes/s: the inputs over the slowest rank's wall time, model
  loading included) and its peak resident memory (``ru_maxrss``);
- the seconds inside the network's forward (the backbone's ``forward_features``, timed around each
  call, with a CUDA synchronise on GPUs). Of the time after the model is loaded, the rest is the
  share the network waits: for data, for the parts written as the run goes, for the assembly.

    OMP_NUM_THREADS=1 python benchmarks/cohort.py --volumes 8 --shape 96 96 64 --work /tmp/cohort
    python benchmarks/cohort.py --device cuda --workers 16 --ranks 1 --volumes 32 --shape 512 512 300   # a GPU

``python -m benchmarks`` runs it as its ``cohort`` section; the device check runs the GPU line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_scans(folder: Path, count: int, shape_xyz: tuple[int, int, int]) -> list[str]:
    """CT-like volumes: a body of soft tissue with an organ and noise in air, stored as uint16 + slope/intercept."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape_xyz), indexing="ij", sparse=True)
    body = (x**2 + y**2) < 0.8
    organ = ((x - 0.2) ** 2 / 0.1 + (y + 0.1) ** 2 / 0.06 + z**2 / 0.5) < 1
    base = np.where(body, 40.0, -1000.0).astype(np.float32) + np.where(organ, 60.0, 0.0).astype(np.float32)
    paths = [str(folder / f"ct_{i:05d}.nii.gz") for i in range(count)]
    if all(Path(p).exists() for p in paths):
        return paths
    hu = base + np.random.default_rng(0).normal(0, 20, shape_xyz).astype(np.float32)  # one noise draw: full-size CTs are big
    stored = np.clip(np.round(hu + 1024.0), 0, 65000).astype(np.uint16)  # HU = stored - 1024
    del hu
    for i, path in enumerate(paths):
        if not Path(path).exists():
            image = nib.Nifti1Image(stored + np.uint16(i % 8), np.diag([0.8, 0.8, 2.0, 1.0]))  # each scan a little brighter
            image.header.set_slope_inter(1.0, -1024.0)
            nib.save(image, path)
    return paths


# -- one process (a rank): the command, timed from inside -----------------------------------------------------


def child(report: Path, argv: list[str]) -> int:
    """Run ``med3d features ARGV`` here, timing the forwards; write this rank's measurements to ``report``."""
    import torch

    from med3d_hub.cli import features as command
    from med3d_hub.cli.app import main
    from med3d_hub.networks.resnet import Med3DResNet

    spent = {"forward_s": 0.0, "forwards": 0, "load_model_s": 0.0}
    forward, load_model = Med3DResNet.forward_features, command.load_model

    def timed_load(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return load_model(*args, **kwargs)
        finally:
            spent["load_model_s"] += time.perf_counter() - begin

    def timed(self, x):
        cuda = x.is_cuda
        if cuda:
            torch.cuda.synchronize(x.device)
        begin = time.perf_counter()
        out = forward(self, x)
        if cuda:
            torch.cuda.synchronize(x.device)
        spent["forward_s"] += time.perf_counter() - begin
        spent["forwards"] += 1
        return out

    Med3DResNet.forward_features, command.load_model = timed, timed_load
    begin = time.perf_counter()
    code = main(["features", *argv])
    wall = time.perf_counter() - begin
    rank = int(os.environ.get("RANK", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "code": code, "wall_s": wall,
                                                         "peak_rss_bytes": peak, **spent}))
    return code


# -- the measurements ---------------------------------------------------------------------------------------


def measure(scans: list[str], work: Path, *, workers: int, ranks: int | None, device: str, model: str,
            size: list[int], env: dict, label: str, timeout: float | None = None) -> dict:
    """One run of the command over ``scans``: alone (``ranks=None``) or under torchrun with ``ranks`` processes."""
    report = work / f"report-{label}"
    output = work / f"features-{label}.npy"
    for path in [*report.glob("*.json"), output]:
        path.unlink(missing_ok=True)
    args = [*scans, "--model", model, "--pretrained", "none", "--device", device, "--workers", str(workers),
            "-o", str(output), "-q"] + (["--size", *map(str, size)] if size else [])
    me = [str(Path(__file__).resolve()), "--child", str(report), "--"]
    if ranks is None:
        command = [sys.executable, *me, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *me, *args]
    row = {"label": label, "workers": workers, "ranks": ranks or 1, "torchrun": ranks is not None, "volumes": len(scans)}
    begin = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "ok": False, "error": f"no result after {timeout:.0f} s"}
    row["process_s"] = time.perf_counter() - begin
    per_rank = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    if proc.returncode != 0 or not per_rank:
        return {**row, "ok": False, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    wall = max(r["wall_s"] for r in per_rank)
    loop = sum(r["wall_s"] - r["load_model_s"] for r in per_rank)  # each rank's time after its model was loaded
    busy = sum(r["forward_s"] for r in per_rank) / loop
    return {**row, "ok": True, "wall_s": wall, "volumes_per_s": len(scans) / wall,
            "load_model_s": max(r["load_model_s"] for r in per_rank),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_rank),
            "peak_rss_per_rank": [r["peak_rss_bytes"] for r in per_rank],
            "network_busy_share": busy, "network_waits_share": 1.0 - busy,
            "forwards": sum(r["forwards"] for r in per_rank)}


def run(work: Path, *, volumes: int, shape: tuple[int, int, int], workers=(1, 2), ranks=(1, 2), device: str = "cpu",
        model: str = "resnet10", size: list[int] | None = None, env: dict | None = None, log=print,
        timeout: float | None = None) -> dict:
    """Every measurement of the cohort benchmark; returns the rows (one per configuration) and the setup.

    ``timeout``: seconds for each run of the command (the device check's budget).
    """
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    scans = make_scans(work / "scans", volumes, shape)
    log(f"  {volumes} CT-like scans of {' x '.join(map(str, shape))} voxels (uint16 + slope), {model}, {device}")
    measure(scans[:1], work, workers=1, ranks=None, device=device, model=model, size=size, env=env, label="warm-up",
            timeout=timeout)
    rows = []
    configurations = [(w, None) for w in workers] + [(1, r) for r in ranks]
    for w, r in configurations:
        label = f"workers{w}" if r is None else f"ranks{r}"
        row = measure(scans, work, workers=w, ranks=r, device=device, model=model, size=size, env=env, label=label,
                      timeout=timeout)
        rows.append(row)
        if row["ok"]:
            log(f"  {label}: {row['volumes_per_s']:.2f} volumes/s, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB per "
                f"process, network waiting {100 * row['network_waits_share']:.0f}% of the wall time")
        else:
            log(f"  ! {label}: {row['error'][:400]}")
    return {"volumes": volumes, "shape_xyz": list(shape), "model": model, "device": device, "size": size, "rows": rows}


def markdown(result: dict) -> list[str]:
    lines = [f"### Cohort: `med3d features` over {result['volumes']} CT-like scans of "
             f"{' x '.join(map(str, result['shape_xyz']))} voxels (uint16 + slope, {result['model']}, {result['device']})", "",
             "| run | volumes/s | wall s | peak RSS per process GB | network busy | network waits |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        run_name = f"torchrun, {r['ranks']} rank(s)" if r["torchrun"] else f"one process, --workers {r['workers']}"
        if not r["ok"]:
            lines.append(f"| {run_name} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {run_name} | {r['volumes_per_s']:.2f} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{100 * r['network_busy_share']:.0f}% | {100 * r['network_waits_share']:.0f}% |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        sys.path.insert(0, str(ROOT))
        return child(Path(argv[1]), argv[3:])
    p = argparse.ArgumentParser(prog="python benchmarks/cohort.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/med3d-cohort-bench", help="folder for the scans and outputs (kept)")
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ranks", type=int, nargs="*", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet10")
    p.add_argument("--size", type=int, nargs=3, help="network input (default: the weights' preprocessing)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    result = run(Path(args.work), volumes=args.volumes, shape=tuple(args.shape), workers=args.workers,
                 ranks=args.ranks, device=args.device, model=args.model, size=args.size)
    print("\n".join(markdown(result)))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if all(r["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
