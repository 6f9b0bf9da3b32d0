"""The benchmark: every fast path of med3d-hub against the baseline a user has today, in one run.

    python -m benchmarks                    # full run (about 15 minutes on 2 cores)
    python -m benchmarks --quick            # CI: tiny shapes, 1 repeat, under a minute
    python -m benchmarks --out DIR --update-docs --wait-quiet 2400

Sections (``--sections``, default all):

- ``forward``: the Med3D backbone (to layer4) of resnet10 and resnet50 on 1x1x64x128x128 and
  2x1x56x224x224: the upstream-style eager baseline (``benchmarks/reference.py``), the package's
  default eval model, ``optimize_for_inference`` (the fast path),
  the same with ``torch.compile``, and, where the CPU has native bf16, the fast path under bf16
  autocast (opt-in, not a target).
  Real and nominal MACs, GFLOP/s on the real ones, output difference against the baseline.
- ``load``: ``create_model(..., pretrained=...)`` from a warm cache against ``torch.load`` of the
  MedicalNet ``.pth`` plus ``load_state_dict`` into a freshly built network (the path upstream and
  MONAI take), for resnet50 and resnet200, on random weights in the released files' format.
- ``features``: ``med3d features`` end to end on NIfTI files made from nilearn's MNI152 template
  (I/O, preprocessing, forward, writing), and the share of the time spent outside the network.
- ``cohort``: ``med3d features`` over generated CT-like scans (uint16 + slope): volumes/s with 1 and 2
  reading workers and with 1 and 2 torchrun ranks, peak RSS per process, the share of the time the
  network waits for data (``benchmarks/cohort.py``).
- ``train``: co-training steps/s of ``python -m med3d_hub.train`` on synthetic MSD tasks, and the
  samples/s of its data loader alone.
- ``memory``: the peak resident memory of ``med3d features`` (and its reading workers) on a
  full-size uint16 + slope CT, beside MONAI's preprocessing of the same file (``benchmarks/memory.py``).

Each timing runs in a fresh process (``benchmarks/worker.py``) unless ``--quick``; medians of
repeated runs after warm-up; every process reports its peak resident memory. The machine, the
thread count and the load (at the start of each section, and other busy python processes sampled
every 10 s during it) are printed and stored. Writes
``benchmark.json`` and ``benchmark.md`` into ``--out`` (default ``benchmarks/results``);
``--update-docs`` puts the table into docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
SECTIONS = ("forward", "load", "features", "train", "cohort", "memory")

TARGETS = {
    "fast": 1.6,  # fast path throughput / upstream eager baseline, every depth and shape
    "default": 1.2,  # default eval model / baseline
    "load": 3.0,  # torch.load path time / warm-cache create_model time
    "outside_share": 0.25,  # share of `med3d features` time outside the network
    "loader": 2.0,  # data loader samples/s / training samples/s
}

FULL = {
    "forward_archs": ("resnet10", "resnet50"),
    "forward_shapes": ((1, 1, 64, 128, 128), (2, 1, 56, 224, 224)),
    "forward_shapes_gpu": ((1, 1, 128, 128, 128), (4, 1, 128, 128, 128)),  # a GPU needs more work per call
    "warmup": 1,
    "repeats": 3,
    "forward_rounds": 3,  # the variants take turns, a fresh process each, so that drift hits them alike
    "load_archs": ("resnet50", "resnet200"),
    "load_repeats": 5,
    "features_archs": ("resnet10", "resnet50"),
    "features_volumes": 8,
    "features_spacing": 1.5,  # mm: the 1 mm MNI152 template becomes about 131 x 155 x 126 voxels
    "features_size": (128, 128, 128),
    "train_arch": "resnet10",
    "train_shape": (72, 88, 84),
    "train_crop": (64, 64, 64),
    "train_cases": 4,
    "train_steps": 25,
    "train_log_every": 5,
    "loader_batches": 60,
    "cohort_volumes": 16,
    "cohort_shape": (256, 256, 120),  # x, y, z voxels of each generated CT
    "cohort_size": None,  # the weights' preprocessing
    "memory_shape": (512, 512, 600),  # the full-size CT of benchmarks/memory.py
    "memory_size": (56, 448, 448),
    "memory_workers": (0, 1, 2),
    "memory_monai": True,
}
QUICK = {
    "forward_archs": ("resnet10", "resnet50"),
    "forward_shapes": ((1, 1, 16, 32, 32), (2, 1, 16, 24, 24)),
    "warmup": 1,
    "repeats": 1,
    "load_archs": ("resnet10",),
    "load_repeats": 1,
    "features_archs": ("resnet10",),
    "features_volumes": 2,
    "features_spacing": None,  # the 2 mm template as it is
    "features_size": (32, 32, 32),
    "train_arch": "resnet10",
    "train_shape": (20, 24, 22),
    "train_crop": (16, 16, 16),
    "train_cases": 2,
    "train_steps": 3,
    "train_log_every": 1,
    "loader_batches": 6,
    "cohort_volumes": 3,
    "cohort_shape": (40, 40, 24),
    "cohort_size": [16, 32, 32],
    "memory_shape": (48, 48, 32),
    "memory_size": (16, 32, 32),
    "memory_workers": (1,),
    "memory_monai": False,
}

VARIANT_LABELS = {
    "upstream": "upstream-style eager (baseline)",
    "default": "med3d-hub default eval model",
    "fast": "optimize_for_inference (fast path)",
    "fast_compile": "optimize_for_inference(compile=True)",
    "fast_bf16": "fast path + bf16 autocast (opt-in)",
    "onnx": "ONNX in onnxruntime (CPU)",
}


# -- the machine and its load ------------------------------------------------------------------------


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(threads: int) -> dict:
    import torch

    name, flags = _cpuinfo()
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return {
        "cpu": name,
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": sorted(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16") if f in flags),
        "native_bf16": _native_bf16(),
        "memory_bytes": _memory_total(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onednn": onednn.group(1) if onednn else None,
        "threads": threads,
        "platform": platform.platform(),
    }


def _gpu_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _native_bf16() -> bool:
    from med3d_hub.inference.runtime import _native_cpu_amp

    import torch

    return _native_cpu_amp(torch.bfloat16)


def _cpu_ticks(pid: str) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _parent(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


def _ours(pid: str) -> bool:
    """This process, its parent, or one of its descendants (the benchmark's own workers)."""
    me = str(os.getpid())
    if pid in (me, str(os.getppid())):
        return True
    for _ in range(32):
        pid = _parent(pid)
        if pid is None or pid in ("0", "1"):
            return False
        if pid == me:
            return True
    return False


def busy_processes(interval: float = 1.0) -> list[str]:
    """Other python / pytest / torchrun processes that used more than 5% of a CPU over ``interval`` seconds."""
    if not Path("/proc").is_dir():
        return []
    candidates = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _ours(entry.name):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        head = " ".join(Path(part).name for part in cmd.split(" ")[:3])
        if cmd and re.search(r"\b(python[\d.]*|pytest|torchrun)\b", head):
            candidates[entry.name] = (cmd, _cpu_ticks(entry.name))
    time.sleep(interval)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = []
    for pid, (cmd, before) in candidates.items():
        after = _cpu_ticks(pid)
        if before is not None and after is not None and (after - before) / hz / interval > 0.05:
            busy.append(f"{pid} ({100 * (after - before) / hz / interval:.0f}% CPU): {cmd[:110]}")
    return busy


def load_snapshot(interval: float = 1.0) -> dict:
    one, five, fifteen = os.getloadavg()
    return {"time": _dt.datetime.now().isoformat(timespec="seconds"), "loadavg": [one, five, fifteen],
            "other_processes": busy_processes(interval)}


class LoadMonitor:
    """Samples, in a thread, the other busy python processes while a section runs."""

    def __init__(self, every_s: float = 10.0):
        import threading

        self.every_s, self.samples, self.busy_samples, self.seen = every_s, 0, 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            busy = busy_processes(1.0)
            self.samples += 1
            self.busy_samples += bool(busy)
            self.seen.update(b.split(": ", 1)[1][:80] for b in busy)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"samples": self.samples, "samples_with_others_busy": self.busy_samples, "others": sorted(self.seen)}


def wait_until_quiet(limit_s: float, threshold: float = 0.5) -> dict:
    """Poll until the 1-minute load is below ``threshold`` and no other python process is busy, or ``limit_s`` passes."""
    start = time.time()
    while True:
        snap = load_snapshot()
        if snap["loadavg"][0] < threshold and not snap["other_processes"]:
            return {**snap, "waited_s": round(time.time() - start), "quiet": True}
        if time.time() - start >= limit_s:
            return {**snap, "waited_s": round(time.time() - start), "quiet": False}
        time.sleep(20)


# -- running workers -------------------------------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, threads: int, env: dict, log):
        self.work, self.threads, self.env, self.log = work, threads, env, log
        self.count = 0

    def run(self, jobs: list[dict], timeout: float | None = None) -> dict:
        """Run ``jobs`` in one fresh process; returns ``{id: result}``."""
        self.count += 1
        spec = self.work / f"jobs{self.count}.json"
        for job in jobs:
            job.setdefault("threads", self.threads)
        spec.write_text(json.dumps(jobs))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec)], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        results = {}
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                results[result.pop("id")] = result
        for job in jobs:
            if job["id"] not in results:
                results[job["id"]] = {"ok": False, "error": f"worker exited with {proc.returncode}: {proc.stderr[-1500:]}"}
            if not results[job["id"]]["ok"]:
                self.log(f"  ! {job['id']}: {results[job['id']]['error'][:400]}")
        return results


# -- (a) forward -------------------------------------------------------------------------------------------


def _forward_weights(arch: str, path: Path) -> None:
    """Random weights of the real layout, BatchNorm statistics included, so that folding has work to do."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from med3d_hub.weights.hub_model import build_model

    torch.manual_seed(0)
    model = build_model(arch, num_classes=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _forward_onnx(arch: str, weights: Path, work: Path, quick: bool) -> str:
    """The layer4 map of the benchmark's weights as ONNX, once per depth: its sizes are dynamic.

    The default exporter (dynamo) as a user runs it; the quick smoke run takes the faster TorchScript one.
    """
    import shutil

    from safetensors.torch import load_file

    import med3d_hub

    model = med3d_hub.create_model(arch, num_classes=0)
    model.load_state_dict(load_file(str(weights)), strict=True)
    folder = work / f"{arch}.onnx"
    shutil.rmtree(folder, ignore_errors=True)
    done = med3d_hub.export_onnx(model.eval(), folder, returns="layer4", exporter="torchscript" if quick else "auto")
    return str(done.file)


def section_forward(runner: Runner, cfg: dict, args) -> dict:
    import numpy as np

    from benchmarks.reference import count_macs

    gpu = args.device.startswith("cuda")
    bf16 = _gpu_bf16() if gpu else _native_bf16()
    variants = ["upstream", "default", "fast"]
    if not args.no_compile and not args.quick:
        variants.append("fast_compile")
    if bf16 and not args.quick:
        variants.append("fast_bf16")
    if not gpu and importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        variants.append("onnx")  # with the [deploy] extra
    groups = []  # (arch, shape, MACs, jobs), the baseline first in each
    for arch in cfg["forward_archs"]:
        weights = runner.work / f"{arch}.forward.safetensors"
        _forward_weights(arch, weights)
        # The quick smoke run exports the first depth only: an export costs more than its tiny forwards.
        onnx = "onnx" in variants and (not args.quick or arch == cfg["forward_archs"][0])
        onnx_file = _forward_onnx(arch, weights, runner.work, args.quick) if onnx else None
        for shape in cfg["forward_shapes"]:
            jobs = []
            for variant in (v for v in variants if v != "onnx" or onnx):
                jid = f"forward/{arch}/{'x'.join(map(str, shape))}/{variant}"
                jobs.append({"id": jid, "kind": "forward", "arch": arch, "shape": list(shape), "variant": variant,
                             "device": args.device,
                             "weights": str(weights), "onnx": onnx_file, "warmup": cfg["warmup"], "repeats": cfg["repeats"],
                             "output": str(runner.work / (jid.replace("/", "_") + ".npy"))})
            groups.append((arch, shape, count_macs(arch, shape), jobs))
    dtypes = ["float32"] + (["bfloat16"] if bf16 else [])
    peak_job = {"id": "forward/peak", "kind": "peak", "size": 512 if args.quick else (8192 if gpu else 4096),
                "dtypes": dtypes, "device": args.device, "warmup": 1 if args.quick else 2,
                "repeats": 1 if args.quick else 5}
    peak = runner.run([peak_job])[peak_job["id"]]
    if peak["ok"]:
        runner.log("  matmul peak: " + ", ".join(f"{d} {peak[d + '_gflops']:.0f} GFLOP/s" for d in dtypes))
    results = {}
    if args.quick or args.same_process:  # one process for everything: a smoke run, or a short GPU run
        results = runner.run([job for *_, jobs in groups for job in jobs])
    else:
        for arch, shape, _, jobs in groups:
            for round_ in range(args.rounds or cfg["forward_rounds"]):
                for job in jobs:  # each variant in its own fresh process, in turns
                    r = runner.run([job])[job["id"]]
                    results[job["id"]] = _merge_rounds(results.get(job["id"]), r)
            for job in jobs:
                r = results[job["id"]]
                if r["ok"]:
                    runner.log(f"  {arch} {'x'.join(map(str, shape))} {job['variant']:13s} {r['median_s']:.3f} s")
    rows = []
    for arch, shape, macs, jobs in groups:
        base = results[jobs[0]["id"]]
        ref = np.load(jobs[0]["output"]).astype(np.float64) if base["ok"] else None
        for job in jobs:
            r = results[job["id"]]
            row = {"arch": arch, "shape": list(shape), "variant": job["variant"], "macs_real": macs["real"],
                   "macs_nominal": macs["nominal"], **r}
            if r["ok"]:
                row["gflops"] = 2 * macs["real"] / r["median_s"] / 1e9
                if base["ok"]:
                    row["speedup"] = base["median_s"] / r["median_s"]
                    out = np.load(job["output"]).astype(np.float64)
                    row["max_rel_diff"] = float(np.abs(out - ref).max() / np.abs(ref).max())
                os.unlink(job["output"])
            rows.append(row)
    return {"rows": rows, "variants": variants, "peak": peak if peak["ok"] else {}, "device": args.device}


# -- (b) loading ---------------------------------------------------------------------------------------------


def _merge_rounds(so_far: dict | None, new: dict) -> dict:
    """One variant's rounds as one result: every timed run, the first round's first call, the highest peaks."""
    if so_far is None or not new["ok"]:
        return new if so_far is None or so_far["ok"] else so_far
    times = so_far["times_s"] + new["times_s"]
    merged = {**new, "times_s": times, "median_s": _median(times), "min_s": min(times),
              "first_call_s": so_far["first_call_s"], "rounds": so_far.get("rounds", 1) + 1}
    for key in ("peak_bytes", "forward_peak_extra_bytes", "process_peak_bytes"):
        if so_far.get(key) is not None and new.get(key) is not None:
            merged[key] = max(so_far[key], new[key])
    return merged


def _write_pth(arch: str, path: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from medicalnet_files import medicalnet_bytes, sha256

    data = medicalnet_bytes(arch)
    path.write_bytes(data)
    medicalnet_bytes.cache_clear()
    return sha256(data)


def section_load(runner: Runner, cfg: dict, args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from medicalnet_files import entry, write_manifest

    rows = []
    entries = []
    files = {}
    for arch in cfg["load_archs"]:
        pth = runner.work / f"{arch}.pth"
        data_sha = _write_pth(arch, pth)
        files[arch] = (pth, data_sha)
        entries.append(entry(arch, "bench", b"", sha256=data_sha, size=pth.stat().st_size))
    write_manifest(Path(runner.env["MED3D_HUB_MANIFEST"]), *entries)

    for arch in cfg["load_archs"]:
        pth, _ = files[arch]
        base = {"kind": "load", "arch": arch, "pth": str(pth), "tag": "bench"}
        # the first load converts the .pth into the safetensors cache; every later one is warm
        plan = [("first", 1, 0)] + [(v, cfg["load_repeats"], 0 if args.quick else 2)
                                     for v in ("upstream", "named", "file", "random")]
        results: dict[str, list] = {}
        if args.quick:
            jobs = [{**base, "id": f"load/{arch}/{v}", "variant": v, "again": again} for v, _, again in plan]
            got = runner.run(jobs)
            for job in jobs:
                results[job["variant"]] = [got[job["id"]]]
        else:
            for rep in range(cfg["load_repeats"]):  # interleaved: a drift in load hits every variant alike
                for v, n, again in plan:
                    if rep < n:
                        got = runner.run([{**base, "id": f"load/{arch}/{v}/{rep}", "variant": v, "again": again}])
                        results.setdefault(v, []).append(next(iter(got.values())))
        reference = None
        for v, _, _ in plan:
            runs = results[v]
            ok = [r for r in runs if r["ok"]]
            row = {"arch": arch, "variant": v, "size_bytes": pth.stat().st_size, "ok": bool(ok) and len(ok) == len(runs)}
            if not row["ok"]:
                row["error"] = next(r["error"] for r in runs if not r["ok"])
            if ok:
                row["median_s"] = _median([r["first_s"] for r in ok])
                again = [r["again_s"] for r in ok if r.get("again_s") is not None]
                row["again_s"] = _median(again) if again else None
                row["peak_bytes"] = max(r["peak_bytes"] for r in ok)
                row["runs"] = len(ok)
                checksum = ok[0].get("checksum")
                if v == "upstream":
                    reference = checksum
                row["checksum"] = checksum
            rows.append(row)
            if ok:
                runner.log(f"  {arch} {v:9s} {row['median_s']:.3f} s")
        up = next((r for r in rows if r["arch"] == arch and r["variant"] == "upstream" and r["ok"]), None)
        for row in rows:
            if row["arch"] != arch or not row["ok"]:
                continue
            if up is not None:
                row["speedup"] = up["median_s"] / row["median_s"]
            if row["variant"] != "random" and reference is not None:
                row["weights_match"] = _close(row["checksum"], reference)
    return {"rows": rows}


def _close(a, b) -> bool:
    return a is not None and b is not None and a[0] == b[0] and abs(a[1] - b[1]) <= 1e-9 * max(1.0, abs(b[1]))


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


# -- (c) med3d features --------------------------------------------------------------------------------------


def _mni_volumes(folder: Path, count: int, spacing: float | None) -> list[str]:
    """NIfTI files of nilearn's MNI152 T1 template (int16, gzip), each slightly different."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=1 if spacing else 2)
    data = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    if spacing:
        src = abs(affine[0, 0])
        shape = [max(1, round(n * src / spacing)) for n in data.shape]
        data = F.interpolate(torch.from_numpy(data)[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
        affine[:3, :3] *= spacing / src
    data = data / max(float(data.max()), 1e-6) * 1000.0
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        noise = rng.normal(0, 5.0, size=data.shape).astype(np.float32)
        noisy = np.where(data > 0, data * rng.uniform(0.9, 1.1) + noise, 0.0)  # the template's zero background stays
        path = folder / f"mni_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(np.round(noisy).astype(np.int16), affine), str(path))
        paths.append(str(path))
    return paths


def section_features(runner: Runner, cfg: dict, args) -> dict:
    import nibabel as nib

    folder = runner.work / "scans"
    folder.mkdir(exist_ok=True)
    paths = _mni_volumes(folder, cfg["features_volumes"], cfg["features_spacing"])
    volume_shape = list(nib.load(paths[0]).shape)
    rows = []
    for arch in cfg["features_archs"]:
        pth = runner.work / f"{arch}.features.pth"
        if not pth.exists():
            _write_pth(arch, pth)
        size = [str(s) for s in cfg["features_size"]]
        common = ["features", "--model", arch, "--pretrained", str(pth), "--size", *size, "--crop-foreground",
                  "--device", "cpu", "-q"]
        job = {
            "id": f"features/{arch}", "kind": "features",
            # the warm-up run converts the weights into the cache and starts oneDNN; the timed run follows
            "warm_argv": common + [paths[0], "-o", str(runner.work / f"warm_{arch}.npy")],
            "argv": common + paths + ["-o", str(runner.work / f"features_{arch}.npy")],
        }
        r = runner.run([job])[job["id"]]
        row = {"arch": arch, "volumes": len(paths), "volume_shape": volume_shape, "network_input": list(cfg["features_size"]), **r}
        if r["ok"]:
            import numpy as np

            feats = np.load(runner.work / f"features_{arch}.npy")
            row["output_ok"] = bool(feats.shape[0] == len(paths) and np.isfinite(feats).all())
            runner.log(f"  {arch}: {r['total_s']:.2f} s for {len(paths)} volumes, "
                       f"{100 * r['outside_share']:.0f}% outside the network")
        rows.append(row)
    return {"rows": rows}


# -- (e) memory -------------------------------------------------------------------------------------------------


def section_memory(runner: Runner, cfg: dict, args) -> dict:
    from benchmarks import memory

    result = memory.run(runner.work / "memory", cfg["memory_shape"], cfg["memory_size"], cfg["memory_workers"],
                        cfg["memory_monai"], log=runner.log)
    for row in result["rows"]:
        row["ok"] = row["exit_code"] == 0
    return result


# -- (d) co-training -------------------------------------------------------------------------------------------


def section_train(runner: Runner, cfg: dict, args) -> dict:
    from med3d_hub.training.synthetic import make_synthetic_task

    data = runner.work / "msd"
    folders = [make_synthetic_task(data, f"Synth{i + 1}", n, cfg["train_cases"], cfg["train_shape"], seed=i)
               for i, n in enumerate((2, 3))]
    out = runner.work / "train_run"
    batch = 2
    argv = [a for f in folders for a in ("--data", str(f))] + [
        "--model", cfg["train_arch"], "--steps", str(cfg["train_steps"]), "--crop", *map(str, cfg["train_crop"]),
        "--batch-size", str(batch), "--device", args.device, "--cache-dir", str(runner.work / "train_cache"),
        "--output", str(out), "--set", "val_fraction=0", "--set", f"log_every={cfg['train_log_every']}",
        "--set", f"checkpoint_every={cfg['train_steps']}", "--set", "keep_checkpoints=1",
    ] + (["--workers", "1"] if args.quick else [])
    if args.device.startswith("cuda"):  # the GPU training path: bf16 autocast, channels_last_3d, loaders to match
        argv += ["--amp", "bf16", "--set", "channels_last=true", "--workers", "8"]
    # the training command runs in its own process; then the loader alone, in the (idle) worker
    got = runner.run([
        {"id": "train/step", "kind": "train", "argv": argv, "metrics": str(out / "metrics.jsonl"), "batch_size": batch},
        {"id": "train/loader", "kind": "loader", "config": str(out / "config.yaml"), "batches": cfg["loader_batches"]},
    ])
    train, loader = got["train/step"], got["train/loader"]
    rows = [{"what": "training step", "arch": cfg["train_arch"], "crop": list(cfg["train_crop"]), "batch": batch, **train},
            {"what": "data loader alone", "crop": list(cfg["train_crop"]), "batch": batch, **loader}]
    if train["ok"]:
        runner.log(f"  training: {train['steps_per_s']:.3f} steps/s, {train['samples_per_s']:.2f} samples/s")
    if train["ok"] and loader["ok"]:
        rows[-1]["ratio"] = loader["samples_per_s"] / train["samples_per_s"]
        runner.log(f"  loader: {loader['samples_per_s']:.2f} samples/s ({rows[-1]['ratio']:.1f}x the training)")
    return {"rows": rows}


# -- (e) a cohort over workers and ranks -----------------------------------------------------------------------------


def section_cohort(runner: Runner, cfg: dict, args) -> dict:
    from benchmarks import cohort

    return cohort.run(runner.work / "cohort", volumes=cfg["cohort_volumes"], shape=tuple(cfg["cohort_shape"]),
                      size=cfg["cohort_size"], env=runner.env, log=runner.log)


# -- targets and the table ----------------------------------------------------------------------------------------


def evaluate_targets(results: dict) -> list[dict]:
    out = []
    forward = results.get("forward", {}).get("rows", [])
    peak = results.get("forward", {}).get("peak", {}).get("float32_gflops")
    if results.get("forward", {}).get("device", "cpu") != "cpu":
        forward = []  # the forward targets are CPU ratios
    for variant, key in (("fast", "fast"), ("fast_compile", "fast"), ("default", "default")):
        for row in forward:
            if row["variant"] != variant or "speedup" not in row:
                continue
            target = _target(f"{VARIANT_LABELS[variant]}, {row['arch']} {_shape(row['shape'])}",
                             row["speedup"], TARGETS[key], ">=", "x")
            if not target["held"] and peak:  # how close the goal is to what the machine can do at all
                needed = row["gflops"] * TARGETS[key] / row["speedup"]
                target["miss"] += f"; {TARGETS[key]:g}x needs {needed:.0f} GFLOP/s, {100 * needed / peak:.0f}% of the fp32 matmul peak"
            out.append(target)
    for row in results.get("load", {}).get("rows", []):
        if row["variant"] in ("named", "file") and "speedup" in row:
            what = "pretrained=True (manifest)" if row["variant"] == "named" else "pretrained=<local .pth>"
            out.append(_target(f"warm-cache load, {what}, {row['arch']}", row["speedup"], TARGETS["load"], ">=", "x"))
    for row in results.get("features", {}).get("rows", []):
        if row.get("ok"):
            out.append(_target(f"time outside the network, med3d features, {row['arch']}", row["outside_share"],
                               TARGETS["outside_share"], "<=", "%"))
    for row in results.get("train", {}).get("rows", []):
        if row.get("ratio") is not None:
            out.append(_target("data loader samples/s / training samples/s", row["ratio"], TARGETS["loader"], ">=", "x"))
    return out


def _target(what: str, value: float, goal: float, sense: str, unit: str) -> dict:
    held = value >= goal if sense == ">=" else value <= goal
    if unit == "%":
        shown, want = f"{100 * value:.0f}%", f"<= {100 * goal:.0f}%"
        miss = "" if held else f"{100 * (value - goal):.0f} points over"
    else:
        shown, want = f"{value:.2f}x", f">= {goal:g}x"
        miss = "" if held else f"{100 * (1 - value / goal):.0f}% short"
    return {"what": what, "value": value, "goal": goal, "sense": sense, "held": held, "shown": shown, "want": want, "miss": miss}


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _gb(n) -> str:
    return f"{n / 1e9:.2f}" if n else "-"


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Measured {report['started'][:16].replace('T', ' ')} with `{report['command']}`"
        + (" (quick mode: tiny shapes, not a measurement)" if report["quick"] else "") + ".",
        "",
        f"- Machine: {m['cpu']}, {m['cpus_usable']} CPUs, {_gb(m['memory_bytes'])} GB; ISA {', '.join(m['isa']) or '-'}; "
        f"native bf16: {'yes' if m['native_bf16'] else 'no'}.",
        f"- Software: torch {m['torch']} (oneDNN {m['onednn']}), Python {m['python']}; torch threads: {m['threads']}.",
    ]
    for name, sec in report["sections"].items():
        before, during = sec["load_before"], sec["during"]
        busy = during["samples_with_others_busy"] + bool(before["other_processes"]) + bool(sec["load_after"]["other_processes"])
        others = f"busy in {busy} of {during['samples'] + 2} samples" if busy else "none"
        lines.append(f"- Load during `{name}` ({sec['seconds']:.0f} s): 1-min load average {before['loadavg'][0]:.2f} at "
                     f"the start; other busy python processes: {others}.")
    res = report["results"]
    if "forward" in res:
        peak = res["forward"].get("peak", {})
        device = res["forward"].get("device", "cpu")
        fp32_peak = peak.get("float32_gflops")
        if fp32_peak:
            bf16 = f", bf16 {peak['bfloat16_gflops']:.0f} GFLOP/s" if peak.get("bfloat16_gflops") else ""
            where = peak["gpu"] if "gpu" in peak else f"{peak['threads']} threads"
            lines += ["", f"Measured matmul peak ({peak['size']}x{peak['size']}, {where}): "
                          f"fp32 {fp32_peak:.0f} GFLOP/s{bf16}."]
        memory = "peak GPU memory GB (+forward)" if device != "cpu" else "peak RSS GB (+forward)"
        lines += ["", f"### Forward on {peak.get('gpu', 'the CPU') if device != 'cpu' else 'the CPU'} (backbone to layer4, fp32 unless marked)", "",
                  "| model | input | path | median s | speedup | GMAC real / nominal | GFLOP/s (real) | % of matmul peak | "
                  f"max rel. diff | {memory} |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["forward"]["rows"]:
            label = VARIANT_LABELS[r["variant"]]
            if not r["ok"]:
                lines.append(f"| {r['arch']} | {_shape(r['shape'])} | {label} | failed: {r['error'][:80]} | | | | | | |")
                continue
            extra = f" (compile {r['first_call_s']:.0f} s)" if r["variant"] == "fast_compile" else ""
            dtype_peak = peak.get("bfloat16_gflops") if r["variant"] == "fast_bf16" else fp32_peak
            share = f"{100 * r['gflops'] / dtype_peak:.0f}%" + (" (of bf16)" if r["variant"] == "fast_bf16" else "") if dtype_peak else "-"
            lines.append(
                f"| {r['arch']} | {_shape(r['shape'])} | {label}{extra} | {r['median_s']:.3f} | {r.get('speedup', 0):.2f}x | "
                f"{r['macs_real'] / 1e9:.1f} / {r['macs_nominal'] / 1e9:.1f} | {r['gflops']:.0f} | "
                f"{share} | "
                f"{r.get('max_rel_diff', float('nan')):.1e} | {_gb(r['peak_bytes'])} (+{_gb(r['forward_peak_extra_bytes'])}) |")
    if "load" in res:
        lines += ["", "### Loading weights (fresh process per run, warm page cache)", "",
                  "| model | file | path | median s | speedup | again in-process s | peak RSS GB | weights match |",
                  "|---|---|---|---|---|---|---|---|"]
        names = {"upstream": "build (random init) + `torch.load` + `load_state_dict` (baseline)",
                 "named": "`create_model(name, pretrained=True)`, warm cache",
                 "file": "`create_model(arch, pretrained=path.pth)`, warm cache (file hashed once, then remembered)",
                 "first": "`create_model(arch, pretrained=path.pth)`, first time (converts, caches)",
                 "random": "`create_model(arch)`, random init, no weights"}
        for r in res["load"]["rows"]:
            if not r["ok"]:
                lines.append(f"| {r['arch']} | | {names[r['variant']]} | failed: {r['error'][:80]} | | | | |")
                continue
            again = f"{r['again_s']:.3f}" if r.get("again_s") is not None else "-"
            match = {True: "yes", False: "NO"}.get(r.get("weights_match"), "-")
            lines.append(f"| {r['arch']} | {r['size_bytes'] / 1e6:.0f} MB | {names[r['variant']]} | {r['median_s']:.3f} | "
                         f"{r.get('speedup', 0):.2f}x | {again} | {_gb(r['peak_bytes'])} | {match} |")
    if "features" in res:
        lines += ["", "### `med3d features` end to end (NIfTI, int16 gzip, MNI152 template)", "",
                  "| model | volumes | file voxels -> network input | total s | forward s | outside network | "
                  "network waits for data s | model load + prepare s | startup (imports) s | peak RSS GB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["features"]["rows"]:
            if not r["ok"]:
                lines.append(f"| {r['arch']} | | | failed: {r['error'][:80]} | | | | | | |")
                continue
            lines.append(f"| {r['arch']} | {r['volumes']} | {_shape(r['volume_shape'])} -> {_shape(r['network_input'])} | "
                         f"{r['total_s']:.2f} | {r['forward_s']:.2f} | {100 * r['outside_share']:.0f}% "
                         f"({100 * r['outside_share_with_startup']:.0f}% with startup) | {r['waiting_for_data_s']:.2f} | "
                         f"{r['load_model_s'] + r['prepare_s']:.2f} | {r['import_s']:.2f} | {_gb(r['peak_bytes'])} |")
    if "train" in res:
        where = "CPU" if report.get("device", "cpu") == "cpu" else f"{report['device']}, AMP bf16, channels_last_3d"
        lines += ["", f"### Co-training on synthetic MSD tasks (2 tasks, {where})", "",
                  "| what | model | crop x batch | steps/s | samples/s | ratio | peak RSS GB |", "|---|---|---|---|---|---|---|"]
        for r in res["train"]["rows"]:
            if not r["ok"]:
                lines.append(f"| {r['what']} | | | failed: {r['error'][:80]} | | | |")
                continue
            steps = f"{r['steps_per_s']:.3f}" if "steps_per_s" in r else "-"
            ratio = f"{r['ratio']:.1f}x" if r.get("ratio") is not None else "-"
            extra = f" ({r['workers']} workers)" if "workers" in r else ""
            lines.append(f"| {r['what']}{extra} | {r.get('arch', '-')} | {_shape(r['crop'])} x {r['batch']} | {steps} | "
                         f"{r['samples_per_s']:.2f} | {ratio} | {_gb(r['peak_bytes'])} |")
    if "cohort" in res:
        from benchmarks import cohort

        lines += ["", *cohort.markdown(res["cohort"])]
    if "memory" in res:
        from benchmarks import memory

        lines += ["", "### Peak memory of `med3d features` on one CT (process tree, PSS)", "", memory.table(res["memory"])]
    if report["targets"]:
        lines += ["", "### Targets", "", "| target | measured | goal | held | missed by |", "|---|---|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['what']} | {t['shown']} | {t['want']} | {'yes' if t['held'] else 'no'} | {t['miss'] or '-'} |")
    return "\n".join(lines) + "\n"


def update_docs(markdown: str, doc: Path = DOC) -> None:
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{markdown}{END}{tail}", encoding="utf-8")


# -- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 repeats, one process per section (CI)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for benchmark.json and benchmark.md")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPUs)")
    p.add_argument("--repeats", type=int, help="timed repeats per forward (default 7; quick 2)")
    p.add_argument("--archs", help="comma-separated depths of the forward section (default resnet10,resnet50)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    p.add_argument("--rounds", type=int, help="turns of the forward variants, a fresh process each (default 3)")
    p.add_argument("--same-process", action="store_true",
                   help="every forward timing in one process, one round (a short GPU run: no process start per timing)")
    p.add_argument("--device", default="cpu",
                   help="where the forward and train sections run: cpu (default) or cuda[:N] (128^3-class inputs, "
                        "AMP bf16, channels_last_3d, cuDNN benchmark; the load and features sections stay on the CPU)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each section, wait up to this long for load < 0.5 and no other busy python process")
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (weights, scans, runs)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            p.error(f"--device {args.device}: this machine has no CUDA device that PyTorch can use; use --device cpu")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.device.startswith("cuda") and "forward_shapes_gpu" in cfg:
        cfg["forward_shapes"] = cfg["forward_shapes_gpu"]
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.archs:
        cfg["forward_archs"] = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)

    machine = machine_info(threads)
    log(f"benchmark{' (quick)' if args.quick else ''}: {machine['cpu']}, {machine['cpus_usable']} CPUs, "
        f"ISA {' '.join(machine['isa'])}, torch {machine['torch']} (oneDNN {machine['onednn']}), {threads} threads")
    work_dir = tempfile.mkdtemp(prefix="med3d-bench-")
    work = Path(work_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "MED3D_HUB_MANIFEST": str(work / "manifest.json"), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    env.pop("MED3D_HUB_CACHE", None)
    (work / "manifest.json").write_text(json.dumps({"schema_version": 1, "weights": []}))  # filled by `load`
    runner = Runner(work, threads, env, log)
    report = {"command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
              "quick": args.quick, "device": args.device, "started": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine, "config": {k: v for k, v in cfg.items()}, "targets_goal": TARGETS,
              "sections": {}, "results": {}}
    functions = {"forward": section_forward, "load": section_load, "features": section_features, "train": section_train,
                 "cohort": section_cohort, "memory": section_memory}
    try:
        for name in args.sections:
            if args.wait_quiet:
                quiet = wait_until_quiet(args.wait_quiet)
                log(f"[{name}] waited {quiet['waited_s']} s for a quiet machine: load {quiet['loadavg'][0]:.2f}, "
                    f"{len(quiet['other_processes'])} other busy python process(es){'' if quiet['quiet'] else ' (gave up waiting)'}")
            before = load_snapshot(0.2 if args.quick else 1.0)
            log(f"[{name}] load average {before['loadavg'][0]:.2f}; other busy python processes: {len(before['other_processes'])}")
            start = time.perf_counter()
            with LoadMonitor(5.0 if args.quick else 10.0) as monitor:
                report["results"][name] = functions[name](runner, cfg, args)
            after = load_snapshot(0.2 if args.quick else 1.0)
            report["sections"][name] = {"load_before": before, "load_after": after, "during": monitor.summary(),
                                        "seconds": time.perf_counter() - start}
            log(f"[{name}] done in {time.perf_counter() - start:.0f} s; load average {after['loadavg'][0]:.2f}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    report["targets"] = evaluate_targets(report["results"])
    report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    markdown = render_markdown(report)
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "benchmark.md").write_text(markdown)
    log("")
    log(markdown)
    log(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    if args.update_docs:
        update_docs(markdown)
        log(f"updated {DOC}")
    failed = [r for sec in report["results"].values() for r in sec.get("rows", []) if not r.get("ok", True)]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
