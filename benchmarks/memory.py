"""Peak memory of ``med3d features`` on one full-size CT, beside MONAI's preprocessing of the same file.

    nice -n 10 python benchmarks/memory.py [--work /tmp/med3d-memory] [--shape 512 512 600]

The CT: 512 x 512 x 600 voxels of 0.7 x 0.7 x 0.5 mm, stored as uint16 with scl_slope 1 and
scl_inter -1024 (a common CT encoding) in a gzip NIfTI, in LPS voxel order; a body of soft tissue
and bone in air, with noise. Measured, each in a fresh process:

- ``med3d features CT ... -o f.npy --model resnet10 --pretrained none`` (the weights' preprocessing:
  crop to the non-zero voxels, 0.5-99.5 percentile clip and z-score, resize to 56 x 448 x 448) with
  ``--workers 0`` (all in one process) on one CT, and ``--workers N`` on N + 1 CTs, so that the
  network runs on one while every worker reads another (a cohort's steady state);
- MONAI's ``LoadImage -> EnsureChannelFirst -> CropForeground -> ScaleIntensityRangePercentiles ->
  NormalizeIntensity -> Resize`` on the same file (preprocessing only: no network).

Peak resident memory of the whole process tree (the command and its worker processes), sampled every
0.1 s from /proc while it runs: the sum of PSS (shared pages counted once, so a forked worker does not count the
pages it shares with its parent) and, as an upper bound, the sum of each process's own peak RSS
(VmHWM, from the kernel: exact, but it counts shared pages in every process). Resident memory
does not depend on the machine's load, so a shared machine measures it as well as an idle one.

Writes ``memory.json`` and ``memory.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FULL_SHAPE = (512, 512, 600)
SPACING = (0.7, 0.7, 0.5)
BUDGET = {"one_worker": 2.0e9, "per_worker": 1.2e9}  # issue 25: the uint16 + slope CT, resnet10
NETWORK_SIZE = (56, 448, 448)  # the resize of resnet10's weights, for MONAI's pipeline too


def make_ct(path: Path, shape=FULL_SHAPE) -> Path:
    """The CT (see the module docstring), written once; built slab by slab so the writer stays small."""
    import nibabel as nib

    if path.exists():
        return path
    nx, ny, nz = shape
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, nx, dtype=np.float32), np.linspace(-1, 1, ny, dtype=np.float32), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    bone = ((x / 0.12) ** 2 + ((y + 0.45) / 0.1) ** 2 < 1) | ((np.abs(x) - 0.55) ** 2 / 0.01 + y**2 / 0.04 < 1)
    hu_slice = np.where(body, 40.0, -1000.0) + np.where(bone, 660.0, 0.0)
    data = np.empty(shape, np.uint16, order="F")
    for z0 in range(0, nz, 50):
        z1 = min(nz, z0 + 50)
        noise = rng.normal(0, 20, size=(nx, ny, z1 - z0)).astype(np.float32)
        data[:, :, z0:z1] = np.clip(np.rint(hu_slice[..., None] + noise + 1024), 0, 4095).astype(np.uint16)
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS voxel order: read_volume flips it
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(np.uint16)
    image.header.set_slope_inter(1.0, -1024.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.nii.gz")
    nib.save(image, partial)
    os.replace(partial, path)
    return path


# -- measuring a process tree ------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids[parent].append(int(name))
    return kids


def _fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class TreeMemory:
    """Peaks of the summed PSS and RSS of a process and its descendants, over the samples taken."""

    def __init__(self, root: int):
        self.root = root
        self.peak_pss = self.peak_rss = self.processes = 0
        self.hwm: dict[int, int] = {}  # pid -> its own peak RSS (VmHWM), the last seen

    def sample(self) -> None:
        kids, tree, todo = _children(), [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += kids.get(pid, [])
        pss = rss = 0
        for pid in tree:
            rollup = _fields(f"/proc/{pid}/smaps_rollup", ("Rss", "Pss"))
            pss, rss = pss + rollup.get("Pss", 0), rss + rollup.get("Rss", 0)
            hwm = _fields(f"/proc/{pid}/status", ("VmHWM",)).get("VmHWM")
            if hwm:
                self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.processes = max(self.processes, len(tree))


def measure(argv: list[str], env: dict, label: str, log: Path, every_s: float = 0.1, **facts) -> dict:
    """Run ``argv`` (its output into ``log``), sampling its tree until it ends; its peaks."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        tree = TreeMemory(proc.pid)
        while proc.poll() is None:
            tree.sample()
            time.sleep(every_s)
    row = {"label": label, **facts, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
           "peak_pss_bytes": tree.peak_pss, "peak_rss_sum_bytes": tree.peak_rss,
           "sum_of_process_peaks_bytes": sum(tree.hwm.values()),
           "process_peaks_bytes": sorted(tree.hwm.values(), reverse=True), "processes": tree.processes}
    if proc.returncode != 0:
        row["error"] = log.read_text()[-1500:]
    return row


# -- MONAI's pipeline, in a child process -------------------------------------------------------------


def _nonzero(x):
    return x != 0  # the foreground of med3d's crop_foreground (MONAI's default keeps x > 0 only)


def run_monai(path: str, size) -> None:
    from monai.transforms import (
        Compose, CropForeground, EnsureChannelFirst, LoadImage, NormalizeIntensity, Resize,
        ScaleIntensityRangePercentiles,
    )

    pipeline = Compose([LoadImage(image_only=True), EnsureChannelFirst(), CropForeground(select_fn=_nonzero),
                        ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
                        NormalizeIntensity(), Resize(tuple(size))])
    out = pipeline(path)
    print("monai output", tuple(out.shape), out.dtype)


# -- the benchmark ------------------------------------------------------------------------------------


def run(work: Path, shape=FULL_SHAPE, size=NETWORK_SIZE, workers=(0, 1, 2), monai=True, log=print) -> dict:
    """Every measurement on one generated CT; the rows and the budget's verdict."""
    work.mkdir(parents=True, exist_ok=True)
    log(f"memory: writing the {' x '.join(map(str, shape))} uint16 + slope CT")
    ct = make_ct(work / f"ct_{'x'.join(map(str, shape))}.nii.gz", shape)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1"}
    rows = []
    for n in workers:
        inputs = [str(ct)] * (n + 1)  # every worker reads one while the network runs on another
        argv = [sys.executable, "-m", "med3d_hub", "features", *inputs, "-o", str(work / f"features_{n}.npy"),
                "--model", "resnet10", "--pretrained", "none", "--device", "cpu", "--workers", str(n), "-q"]
        if tuple(size) != NETWORK_SIZE:
            argv += ["--size", *map(str, size)]
        rows.append(measure(argv, env, f"med3d features, --workers {n}", work / f"features_{n}.log", tool="med3d",
                            workers=n, inputs=len(inputs)))
        log(f"  {rows[-1]['label']} ({len(inputs)} CT): {_gb(rows[-1]['peak_pss_bytes'])} GB PSS, "
            f"{rows[-1]['seconds']} s")
    if monai:
        argv = [sys.executable, "-m", "benchmarks.memory", "--monai", str(ct), "--size", *map(str, size)]
        rows.append(measure(argv, env, "MONAI LoadImage ... Resize (no network)", work / "monai.log", tool="monai",
                            workers=None, inputs=1))
        log(f"  {rows[-1]['label']}: {_gb(rows[-1]['peak_pss_bytes'])} GB PSS, {rows[-1]['seconds']} s")
    voxels = int(np.prod(shape))
    by_workers = {r["workers"]: r for r in rows if r["tool"] == "med3d" and r["exit_code"] == 0}
    verdict = {}
    if 1 in by_workers:
        verdict["one_worker_bytes"] = by_workers[1]["peak_pss_bytes"]
        verdict["one_worker_ok"] = verdict["one_worker_bytes"] <= BUDGET["one_worker"]
    if 1 in by_workers and 2 in by_workers:
        extra = by_workers[2]["peak_pss_bytes"] - by_workers[1]["peak_pss_bytes"]
        verdict.update(further_worker_bytes=extra, further_worker_ok=extra <= BUDGET["per_worker"],
                       further_worker_bytes_per_voxel=round(extra / voxels, 2))
    return {"ct": {"shape_xyz": list(shape), "spacing_mm": list(SPACING), "stored": "uint16, scl_slope 1, scl_inter -1024",
                   "file_bytes": ct.stat().st_size, "voxels": voxels},
            "network_input": list(size), "budget_bytes": BUDGET, "verdict": verdict, "rows": rows}


def _gb(n) -> str:
    return "-" if not n else f"{n / 1e9:.2f}"


def table(result: dict) -> str:
    ct = result["ct"]
    lines = [f"One CT of {' x '.join(map(str, ct['shape_xyz']))} voxels ({ct['stored']}, gzip NIfTI, "
             f"{ct['file_bytes'] / 1e6:.0f} MB), network input {' x '.join(map(str, result['network_input']))}.", "",
             "| pipeline | CTs | processes | peak PSS GB (tree) | sum of per-process peak RSS GB | largest process GB | s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["exit_code"] != 0:
            lines.append(f"| {r['label']} | {r['inputs']} | failed: {r.get('error', '')[:60]!r} | | | | |")
            continue
        largest = r["process_peaks_bytes"][0] if r["process_peaks_bytes"] else 0
        lines.append(f"| {r['label']} | {r['inputs']} | {r['processes']} | {_gb(r['peak_pss_bytes'])} | "
                     f"{_gb(r['sum_of_process_peaks_bytes'])} | {_gb(largest)} | {r['seconds']:.0f} |")
    v = result["verdict"]
    if "one_worker_bytes" in v:
        lines += ["", f"Budget: one worker {_gb(v['one_worker_bytes'])} GB (<= 2.0: {'yes' if v['one_worker_ok'] else 'NO'})"
                  + (f"; a further worker {_gb(v['further_worker_bytes'])} GB, {v['further_worker_bytes_per_voxel']} "
                     f"bytes per voxel (<= 1.2 GB: {'yes' if v['further_worker_ok'] else 'NO'})" if "further_worker_bytes" in v else "")
                  + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/med3d-memory", help="folder for the CT (kept, reused) and the outputs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for memory.json and memory.md")
    p.add_argument("--shape", nargs=3, type=int, default=list(FULL_SHAPE), metavar=("X", "Y", "Z"))
    p.add_argument("--size", nargs=3, type=int, default=list(NETWORK_SIZE), metavar=("D", "H", "W"))
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--monai", metavar="CT", help=argparse.SUPPRESS)  # the child that runs MONAI's pipeline
    args = p.parse_args(argv)
    if args.monai:
        run_monai(args.monai, args.size)
        return 0
    result = run(Path(args.work), tuple(args.shape), tuple(args.size), tuple(args.workers))
    result.update(command="python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  load_average=os.getloadavg(), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "memory.md").write_text(table(result))
    print(table(result))
    return 0 if all(r["exit_code"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
