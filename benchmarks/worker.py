"""One measurement in a fresh process: ``python -m benchmarks.worker JOBS.json``.

``JOBS.json`` holds a list of jobs (see ``run.py``); each prints one JSON line prefixed with
``RESULT `` on stdout. Times are wall-clock (``time.perf_counter``) medians after warm-up, memory
is the process's peak resident set (``VmHWM``), reset before the measured part where Linux allows.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- memory -------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else 0


def peak_bytes() -> int:
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where not possible."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def children_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


# -- helpers ---------------------------------------------------------------------------------------------


def _setup_threads(threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that wall-clock times cover it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _timed_runs(fn, warmup: int, repeats: int, device: str = "cpu") -> list[float]:
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# -- (a) forward ----------------------------------------------------------------------------------------


def _without_init(build):
    """Build on the meta device with random init skipped (the weights are loaded next; not timed)."""
    import torch

    from med3d_hub.weights.loader import _SkipRandomInitOnMeta

    with torch.device("meta"), _SkipRandomInitOnMeta():
        return build()


def _forward_model(job: dict):
    """The network of ``job["variant"]`` with the job's weights, and the function that runs it."""
    import torch
    from safetensors.torch import load_file

    device = job.get("device", "cpu")
    state = load_file(job["weights"], device=device)
    variant = job["variant"]
    if device.startswith("cuda"):  # cuDNN picks its kernels per shape: part of the GPU fast path only
        torch.backends.cudnn.benchmark = variant not in ("upstream", "default")
    if variant == "upstream":
        from benchmarks.reference import ReferenceBackbone

        net = _without_init(lambda: ReferenceBackbone(job["arch"]))
        net.load_state_dict(state, strict=True, assign=True)
        net.eval()
        return net, net
    if variant == "onnx":  # the file `med3d export --format onnx --returns layer4` writes, under onnxruntime
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        session = ort.InferenceSession(job["onnx"], options, providers=["CPUExecutionProvider"])
        return session, lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    import med3d_hub

    model = _without_init(lambda: med3d_hub.create_model(job["arch"], num_classes=0))
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    if variant == "default":
        return model, model.forward_features
    if variant in ("fast", "fast_bf16"):
        net = med3d_hub.optimize_for_inference(model)
    elif variant == "fast_compile":
        net = med3d_hub.optimize_for_inference(model, compile=True)
    else:
        raise ValueError(f"unknown forward variant {variant!r}")
    del model
    if variant == "fast_bf16":
        def run(x):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                return net.forward_features(x)

        return net, run
    return net, net.forward_features


def job_forward(job: dict) -> dict:
    import numpy as np
    import torch

    threads = _setup_threads(job.get("threads"))
    device = job.get("device", "cpu")
    gpu = device.startswith("cuda")
    torch.manual_seed(job.get("seed", 0))
    x = torch.randn(tuple(job["shape"])).to(device)
    start = time.perf_counter()
    net, run = _forward_model(job)
    prepare_s = time.perf_counter() - start
    gc.collect()
    rss_before = rss_bytes()
    exact_peak = reset_peak()
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = run(x)
        _synchronize(device)
        first_s = time.perf_counter() - start
        times = _timed_runs(lambda: run(x), job["warmup"], job["repeats"], device)
    peak = peak_bytes()
    if job.get("output"):
        np.save(job["output"], out.float().contiguous().cpu().numpy())
    if gpu:  # the GPU's memory is what matters there: report it in the same fields
        peak = torch.cuda.max_memory_allocated(device)
        rss_before, exact_peak = gpu_before, True
    return {
        "device": device,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": [round(t, 5) for t in times],
        "first_call_s": first_s,
        "prepare_s": prepare_s,
        "threads": threads,
        "rss_before_bytes": rss_before,
        "peak_bytes": peak,
        "forward_peak_extra_bytes": peak - rss_before if exact_peak else None,
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "output_shape": list(out.shape),
    }


def job_peak(job: dict) -> dict:
    """The machine's matmul throughput (GFLOP/s, best of the repeats): the ceiling a conv can approach."""
    import torch

    threads = _setup_threads(job.get("threads"))
    device = job.get("device", "cpu")
    n = job["size"]
    out = {"threads": threads, "size": n, "device": device}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    for dtype in job["dtypes"]:
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        times = _timed_runs(lambda: a @ b, job["warmup"], job["repeats"], device)
        out[f"{dtype}_gflops"] = 2 * n**3 / min(times) / 1e9
    return out


# -- (b) loading weights ----------------------------------------------------------------------------------


def _state_checksum(state) -> list[float]:
    keys = sorted(state)
    return [len(keys), float(sum(state[k].double().abs().sum() for k in keys if state[k].is_floating_point()))]


def job_load(job: dict) -> dict:
    import torch

    threads = _setup_threads(job.get("threads"))
    variant, arch = job["variant"], job["arch"]
    import med3d_hub  # the package import is not part of the timed call (the torch import is not either)

    def call():
        if variant == "upstream":
            from benchmarks.reference import ReferenceBackbone

            net = ReferenceBackbone(arch)
            state = torch.load(job["pth"], map_location="cpu", weights_only=True)["state_dict"]
            net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
            return net
        if variant == "random":
            return med3d_hub.create_model(arch, num_classes=0)
        if variant == "named":  # the manifest's weights from the warm cache: no hashing, no network
            return med3d_hub.create_model(f"{arch}.{job['tag']}", pretrained=True, num_classes=0)
        if variant in ("file", "first"):  # a local .pth: its sha256, then the converted copy (converted on "first")
            return med3d_hub.create_model(arch, pretrained=job["pth"], num_classes=0)
        raise ValueError(f"unknown load variant {variant!r}")

    start = time.perf_counter()
    net = call()
    first_s = time.perf_counter() - start
    state = net.state_dict()
    checksum = _state_checksum(state) if variant != "random" else None
    again = []
    if variant != "first":
        for _ in range(job.get("again", 0)):
            del net
            gc.collect()
            start = time.perf_counter()
            net = call()
            again.append(time.perf_counter() - start)
    return {
        "first_s": first_s,
        "again_s": statistics.median(again) if again else None,
        "threads": threads,
        "checksum": checksum,
        "peak_bytes": peak_bytes(),
    }


# -- (c) med3d features -------------------------------------------------------------------------------------


def job_features(job: dict) -> dict:
    start = time.perf_counter()
    import torch  # noqa: F401  (what `python -m med3d_hub features` imports before it starts working)

    from med3d_hub.cli import app as cli
    from med3d_hub.cli import features as command
    from med3d_hub.inference import features

    import_s = time.perf_counter() - start
    threads = _setup_threads(job.get("threads"))
    spent = {"forward": 0.0, "waiting_for_data": 0.0, "prepare": 0.0, "load_model": 0.0, "calls": 0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - begin
                if key == "forward":
                    spent["calls"] += 1

        return wrapper

    def waited(read_ahead):  # the time the network's loop waits for the next read volume
        def wrapper(*args, **kwargs):
            stream = read_ahead(*args, **kwargs)
            while True:
                begin = time.perf_counter()
                item = next(stream, None)
                spent["waiting_for_data"] += time.perf_counter() - begin
                if item is None:
                    return
                yield item

        return wrapper

    forward, read, prepare, load_model = features._forward, features.read_ahead, features._prepare, command.load_model
    results = []
    for i, argv in enumerate([job["warm_argv"], job["argv"]]):
        for key in ("forward", "waiting_for_data", "prepare", "load_model", "calls"):
            spent[key] = 0
        features._forward, features.read_ahead = timed(forward, "forward"), waited(read)
        features._prepare, command.load_model = timed(prepare, "prepare"), timed(load_model, "load_model")
        try:
            exact_peak = reset_peak()
            begin = time.perf_counter()
            code = cli.main(argv)
            total = time.perf_counter() - begin
        finally:
            features._forward, features.read_ahead, features._prepare, command.load_model = forward, read, prepare, load_model
        if code != 0:
            raise RuntimeError(f"med3d {' '.join(argv)} exited with {code}")
        results.append({"total_s": total, **spent, "peak_bytes": peak_bytes() if exact_peak else None})
    timed_run = results[1]
    total = timed_run["total_s"]
    return {
        "import_s": import_s,
        "threads": threads,
        "volumes": timed_run["calls"],
        "total_s": total,
        "forward_s": timed_run["forward"],
        "outside_network_s": total - timed_run["forward"],
        "outside_share": (total - timed_run["forward"]) / total,
        "outside_share_with_startup": (total + import_s - timed_run["forward"]) / (total + import_s),
        "waiting_for_data_s": timed_run["waiting_for_data"],
        "load_model_s": timed_run["load_model"],
        "prepare_s": timed_run["prepare"],
        "first_run_total_s": results[0]["total_s"],
        "peak_bytes": timed_run["peak_bytes"] or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# -- (d) co-training ------------------------------------------------------------------------------------------


def job_train(job: dict) -> dict:
    """The real training command on synthetic tasks; steps/s from its own metrics (first window dropped)."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "med3d_hub.train", *job["argv"]], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"training exited with {proc.returncode}: {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in Path(job["metrics"]).read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in records if r.get("kind") == "train" and "samples_per_s" in r]
    if len(rates) > 1:
        rates = rates[1:]  # the first window holds the loader start and the first (slow) step
    samples_per_s = statistics.median(rates)
    per_step = job["batch_size"]
    return {
        "samples_per_s": samples_per_s,
        "steps_per_s": samples_per_s / per_step,
        "windows": len(rates),
        "wall_s": wall,
        "peak_bytes": children_peak_bytes(),
    }


def job_loader(job: dict) -> dict:
    """The training's data loader alone: same config, dataset, sampler and workers; no model."""
    import torch

    from med3d_hub.training.config import load_config
    from med3d_hub.training.data import prepare_tasks
    from med3d_hub.training.sampling import CropDataset, MicroBatchPlan, MicroBatchSampler, collate

    threads = _setup_threads(job.get("threads"))
    cfg = load_config(job["config"])
    tasks = prepare_tasks(cfg, log=lambda *a, **k: None)
    plan = MicroBatchPlan([t.weight for t in tasks], cfg.seed, 1)
    batches = job["batches"]
    loader = torch.utils.data.DataLoader(
        CropDataset(tasks, plan, cfg.seed, cfg.foreground_prob, cfg.augment),
        batch_sampler=MicroBatchSampler(plan, 0, batches, 0, 1, cfg.batch_size),
        num_workers=cfg.workers, collate_fn=collate, prefetch_factor=4 if cfg.workers else None,
    )
    exact_peak = reset_peak()
    it = iter(loader)
    warm = job.get("warmup_batches", 2)
    for _ in range(warm):  # worker start-up and the first crops
        next(it)
    start = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
    elapsed = time.perf_counter() - start
    return {
        "samples_per_s": n / elapsed,
        "samples": n,
        "workers": cfg.workers,
        "threads": threads,
        "peak_bytes": peak_bytes() if exact_peak else None,  # the loading process; workers not included
    }


JOBS = {"peak": job_peak, "forward": job_forward, "load": job_load, "features": job_features, "train": job_train, "loader": job_loader}


def main(argv: list[str]) -> int:
    jobs = json.loads(Path(argv[0]).read_text())
    for job in jobs:
        try:
            result = {"ok": True, **JOBS[job["kind"]](job)}
        except Exception as err:  # reported in the table, the other measurements go on
            import traceback

            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        print("RESULT " + json.dumps({"id": job["id"], **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
