"""The device check: every GPU path of med3d-hub in one command, each step timed, each failure recorded.

    python -m benchmarks.device_check --device cuda --out DIR --scan mni152_t1.nii.gz
    python -m benchmarks.device_check --device cpu --quick --out DIR      # CI's dry run (tests/test_device_check.py)

Steps (a failing step is recorded and the next one runs):

1. ``environment``: versions, the GPU, NCCL; the package and its training extras import.
2. ``cuda_tests``: ``pytest -m cuda tests`` (every forward path against the CPU, ``tests/test_cuda.py``).
3. ``cotrain_resume``: ``torchrun`` co-training on two synthetic MSD tasks with NCCL (gloo on
   the CPU), AMP bf16 and channels_last_3d (GPU); killed with SIGKILL after a checkpoint, then
   resumed; the loss must fall and the steps must join up.
4. ``cotrain_2proc``: 2 processes on the one GPU with NCCL if NCCL allows it, else gloo.
5. ``finetune_seg`` and ``finetune_cls``: ``med3d finetune seg|cls`` for a few steps.
6. ``features``: ``med3d features`` on a real scan (``--scan``, default nilearn's MNI152 T1),
   on the device and on the CPU; the embeddings must agree.
7. ``cohort``: ``med3d features`` on one GPU with 16 reading workers over generated full-size CTs
   (512 x 512 x 300, uint16 + slope, ``benchmarks/cohort.py``): volumes/s, the GPU's busy share
   (the forward's share of the time after the model is loaded) and the peak RSS.
8. ``benchmark``: ``python -m benchmarks --device DEV --sections forward,train``.

Writes ``device_check.json`` (the summary, rewritten after every step) and ``device_check.log``
(every command and its output) into ``--out``; ``benchmark.json`` and ``benchmark.md`` go to
``--out``/bench. Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Sizes per mode: the GPU run proper, and the CPU dry run (tiny, same steps).
SIZES = {
    "full": {"arch": "resnet10", "shape": (72, 88, 80), "cases": 6, "crop": (64, 64, 64), "batch": 4,
             "steps": 60, "checkpoint_every": 15, "log_every": 5, "workers": 4,
             "finetune_steps": 8, "finetune_crop": (48, 64, 64), "features_size": (128, 128, 128),
             "cohort_volumes": 8, "cohort_shape": (512, 512, 300), "cohort_workers": 16, "cohort_size": None},
    "quick": {"arch": "resnet10", "shape": (28, 32, 28), "cases": 3, "crop": (24, 24, 24), "batch": 2,
              "steps": 16, "checkpoint_every": 4, "log_every": 2, "workers": 0,
              "finetune_steps": 2, "finetune_crop": (16, 16, 16), "features_size": (32, 32, 32),
              "cohort_volumes": 2, "cohort_shape": (40, 40, 24), "cohort_workers": 2, "cohort_size": [16, 32, 32]},
}
# Seconds each step may take at most (the whole check must fit 10 minutes on the GPU).
TIMEOUTS = {"cuda_tests": 150, "cotrain_resume": 120, "cotrain_2proc": 120, "finetune_seg": 60, "finetune_cls": 60,
            "features": 60, "cohort": 150, "benchmark": 180}


class StepFailed(RuntimeError):
    """A step's check did not hold; the message says what was seen."""


class Check:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.gpu = args.device.startswith("cuda")
        self.sizes = SIZES["quick" if args.quick else "full"]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="med3d-device-check-"))
        self.log_path = self.out / "device_check.log"
        self.log_path.write_text("")
        self.summary = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.device_check", *sys.argv[1:]]),
                        "device": self.device, "quick": args.quick,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": [], "all_passed": False}
        self.deadline = time.monotonic() + args.budget
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                    "HF_HOME": str(self.work / "hf"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                    "MED3D_HUB_CACHE": str(self.work / "med3d-cache"), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(key, None)
        if not self.gpu:
            self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text.rstrip("\n") + "\n")
        print(text.rstrip("\n"), flush=True)

    def write_summary(self) -> None:
        steps = self.summary["steps"]
        self.summary["all_passed"] = bool(steps) and all(s["ok"] for s in steps)
        self.summary["seconds"] = round(sum(s["seconds"] for s in steps), 1)
        (self.out / "device_check.json").write_text(json.dumps(self.summary, indent=1, default=str))

    def step(self, name: str, fn) -> None:
        left = self.deadline - time.monotonic()
        self.log(f"\n=== {name} ({left:.0f} s of the budget left)")
        start = time.monotonic()
        record: dict = {"name": name}
        if left < 10:
            record.update(ok=False, error="not run: the time budget was spent")
        else:
            try:
                record.update(ok=True, details=fn() or {})
            except StepFailed as err:
                record.update(ok=False, error=str(err))
            except Exception as err:  # a bug in the step itself: recorded, and the next step runs
                record.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
        record["seconds"] = round(time.monotonic() - start, 1)
        self.log(f"=== {name}: {'passed' if record['ok'] else 'FAILED: ' + record['error']} ({record['seconds']} s)")
        self.summary["steps"].append(record)
        self.write_summary()

    def timeout(self, name: str) -> float:
        scale = 1 if self.gpu else 5  # a busy 2-core CI machine is far slower than the GPU machine's 16 cores
        return max(5.0, min(TIMEOUTS[name] * scale, self.deadline - time.monotonic()))

    def run(self, command: list[str], timeout: float, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command in its own session, its output into the log; on a timeout kill it and its children."""
        self.log("$ " + " ".join(map(str, command)))
        proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, _ = proc.communicate()
            self.log(out[-20000:])
            raise StepFailed(f"no result after {timeout:.0f} s: {' '.join(map(str, command[:6]))} ...") from None
        self.log(out[-20000:])
        done = subprocess.CompletedProcess(command, proc.returncode, out, "")
        if check and proc.returncode != 0:
            raise StepFailed(f"exit status {proc.returncode}: {last_line(out)}")
        return done

    # -- data ----------------------------------------------------------------------------------------------------
    def tasks(self) -> list[Path]:
        from med3d_hub.training.synthetic import make_synthetic_task

        s = self.sizes
        root = self.work / "msd"
        if not root.exists():
            for i, classes in enumerate((2, 3)):
                make_synthetic_task(root, f"Synth{i + 1}", classes, s["cases"], s["shape"], seed=i)
        return sorted(p for p in root.iterdir() if p.is_dir())

    def weights(self) -> Path:
        """A MedicalNet-format .pth of the check's model (random values, the released files' layout)."""
        path = self.work / f"{self.sizes['arch']}.pth"
        if not path.exists():
            sys.path.insert(0, str(ROOT / "tests"))
            from medicalnet_files import medicalnet_bytes

            path.write_bytes(medicalnet_bytes(self.sizes["arch"]))
        return path

    def train_args(self, out: Path, steps: int | None = None) -> list[str]:
        s = self.sizes
        args = [a for f in self.tasks() for a in ("--data", str(f))] + [
            "--model", s["arch"], "--steps", str(steps or s["steps"]), "--crop", *map(str, s["crop"]),
            "--batch-size", str(s["batch"]), "--device", self.device, "--workers", str(s["workers"]),
            "--cache-dir", str(self.work / "cache"), "--output", str(out), "--lr", "0.02",
            "--set", f"log_every={s['log_every']}", "--set", f"checkpoint_every={s['checkpoint_every']}",
            "--set", "keep_checkpoints=2", "--set", "warmup_steps=2", "--set", f"val_every={steps or s['steps']}",
            "--set", "val_max_cases=1",
        ]
        if self.gpu:
            args += ["--amp", "bf16", "--set", "channels_last=true"]
        return args

    def torchrun(self, nproc: int, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "med3d_hub.train", *args]

    # -- the steps -----------------------------------------------------------------------------------------------
    def environment(self) -> dict:
        import torch

        info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
        if self.gpu:
            if not torch.cuda.is_available():
                raise StepFailed("torch sees no CUDA GPU")
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                        bf16=torch.cuda.is_bf16_supported(), devices=torch.cuda.device_count())
            try:
                version = torch.cuda.nccl.version()
                info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
            except Exception as err:
                info["nccl"] = f"unavailable ({err})"
        from importlib import metadata

        for name in ("numpy", "huggingface_hub", "safetensors", "timm", "monai", "nibabel", "PyYAML", "scipy"):
            try:
                info[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                info[name] = None
        missing = [n for n in ("monai", "nibabel", "PyYAML") if info[n] is None]
        code = "import med3d_hub, med3d_hub.training.engine, med3d_hub.training.finetune, med3d_hub.inference.features; print(med3d_hub.__version__)"
        self.run([sys.executable, "-c", code], timeout=60)
        self.log(json.dumps(info))
        if missing:
            raise StepFailed(f"missing packages: {', '.join(missing)} (see docs/performance.md, GPU: the wheels)")
        return info

    def cuda_tests(self) -> dict:
        env = {**self.env, "MED3D_TEST_DEVICE": self.device}
        # every test marked cuda, wherever it is; modules whose extras are missing skip themselves
        done = self.run([sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rs",
                         "-p", "no:cacheprovider"], timeout=self.timeout("cuda_tests"), check=False, env=env)
        result = last_line(done.stdout)
        if done.returncode != 0:
            raise StepFailed(f"pytest exit status {done.returncode}: {result}")
        return {"pytest": result}

    def cotrain_resume(self) -> dict:
        from med3d_hub.training.metrics import read_metrics

        s = self.sizes
        out = self.work / "cotrain"
        command = self.torchrun(1, self.train_args(out))
        self.log("$ " + " ".join(command) + "   (killed after its first checkpoint)")
        proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        first = out / "checkpoints" / f"step_{s['checkpoint_every']:08d}.pt"
        deadline = time.monotonic() + self.timeout("cotrain_resume") / 2
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        finished_early = proc.poll() is not None
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        self.log(output[-20000:])
        if not first.exists():
            raise StepFailed(f"no checkpoint {first.name} appeared: {last_line(output)}")
        final = out / "checkpoints" / f"step_{s['steps']:08d}.pt"
        if finished_early or final.exists():
            raise StepFailed("the run ended before it could be killed; give it more steps")
        killed_at = max(int(p.stem[5:]) for p in (out / "checkpoints").glob("step_*.pt"))
        done = self.run(self.torchrun(1, self.train_args(out) + ["--resume"]), timeout=self.timeout("cotrain_resume"))
        if "resume:" not in done.stdout:
            raise StepFailed("the relaunch did not resume from the checkpoint")
        train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        steps = [r["step"] for r in train]
        if steps != list(range(s["log_every"], s["steps"] + 1, s["log_every"])):
            raise StepFailed(f"the logged steps do not join up after the resume: {steps}")
        losses = [r["loss"] for r in train]
        if not sum(losses[-2:]) / 2 < 0.95 * losses[0]:  # the last two windows against the first
            raise StepFailed(f"the loss did not fall: {losses}")
        if not (out / "encoder.safetensors").is_file():
            raise StepFailed("no encoder.safetensors after the resumed run")
        backend = "nccl" if self.gpu else "gloo"
        if f"({backend})" not in done.stdout:
            raise StepFailed(f"the run did not use {backend}")
        rates = [r["samples_per_s"] for r in train if "samples_per_s" in r][1:]
        return {"backend": backend, "killed_after_step": killed_at, "losses": losses,
                "samples_per_s_median": sorted(rates)[len(rates) // 2] if rates else None}

    def cotrain_2proc(self) -> dict:
        from med3d_hub.training.metrics import read_metrics

        s = self.sizes
        steps = max(4, s["steps"] // 3)
        tried = {}
        backends = ["nccl", "gloo"] if self.gpu else ["gloo"]
        for backend in backends:
            out = self.work / f"cotrain_2proc_{backend}"
            args = self.train_args(out, steps) + ["--set", f"dist_backend={backend}"]
            try:
                done = self.run(self.torchrun(2, args), timeout=self.timeout("cotrain_2proc") / len(backends))
            except StepFailed as err:
                tried[backend] = f"failed: {err}"
                continue
            if f"2 process(es) on {'cuda' if self.gpu else 'cpu'} ({backend})" not in done.stdout:
                raise StepFailed(f"the 2-process run did not report {backend}")
            train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
            if not train or train[-1]["step"] != steps:
                raise StepFailed(f"the 2-process run stopped early: {[r['step'] for r in train]}")
            tried[backend] = "passed"
            return {"backend": backend, "tried": tried, "losses": [r["loss"] for r in train]}
        raise StepFailed(f"no backend ran 2 processes: {tried}")

    def finetune(self, kind: str) -> dict:
        from med3d_hub.training.metrics import read_metrics

        s = self.sizes
        out = self.work / f"finetune_{kind}"
        steps = s["finetune_steps"]
        common = ["--model", s["arch"], "--pretrained", str(self.weights()), "--steps", str(steps),
                  "--crop", *map(str, s["finetune_crop"]), "--batch-size", "2", "--device", self.device,
                  "--workers", str(s["workers"]), "--cache-dir", str(self.work / "cache"), "--output", str(out),
                  "--val-every", str(steps), "--set", "log_every=1", "-q"]
        if self.gpu:
            common += ["--amp", "bf16", "--set", "channels_last=true"]
        if kind == "seg":
            data = ["--data", str(self.tasks()[1]), "--set", "val_fraction=0.34"]
        else:
            from med3d_hub.training.synthetic_classification import make_synthetic_classification

            csv = make_synthetic_classification(self.work / "cls", num_cases=8, shape=tuple(s["finetune_crop"]), split=True)
            data = ["--csv", str(csv)]
        self.run([sys.executable, "-m", "med3d_hub", "finetune", kind, *data, *common], timeout=self.timeout(f"finetune_{kind}"))
        records = read_metrics(out / "metrics.jsonl")
        train = [r for r in records if r["kind"] == "train"]
        val = [r for r in records if r["kind"] == "val"]
        for name in ("model.safetensors", "config.json", "finetuned.safetensors"):
            if not (out / name).is_file():
                raise StepFailed(f"no {name} in the run folder")
        if len(train) != steps or not all(_finite(r["loss"]) for r in train):
            raise StepFailed(f"training records: {train}")
        if not val:
            raise StepFailed("no validation record")
        return {"losses": [r["loss"] for r in train], "validation": {k: v for k, v in val[-1].items() if k != "kind"}}

    def features(self) -> dict:
        import numpy as np

        scan = self.args.scan or nilearn_mni152()
        if not scan or not Path(scan).is_file():
            raise StepFailed(f"no scan to run on ({scan}); pass --scan FILE (the MNI152 template: see docs/performance.md)")
        size = [str(n) for n in self.sizes["features_size"]]
        results = {}
        runs = [("cpu", []), (self.device, [])] + ([(self.device, ["--amp", "bf16"])] if self.gpu else [])
        for i, (device, extra) in enumerate(runs):
            path = self.work / f"features_{i}.npy"
            self.run([sys.executable, "-m", "med3d_hub", "features", scan, "-o", path, "--model", self.sizes["arch"],
                      "--pretrained", self.weights(), "--size", *size, "--crop-foreground", "--device", device,
                      "--maps", "layer4", *extra, "-q"], timeout=self.timeout("features") / len(runs))
            results[i] = np.load(path).astype(np.float64)
        reference = results[0]
        diffs = {}
        for i, (device, extra) in enumerate(runs[1:], 1):
            label = device + (" bf16" if extra else " fp32")
            diffs[label] = float(np.abs(results[i] - reference).max() / np.abs(reference).max())
            tol = 5e-2 if extra else 1e-2  # fp32 on a GPU: cuDNN's convolutions run in TF32 by default
            if not np.isfinite(results[i]).all() or diffs[label] > tol:
                raise StepFailed(f"{label} features differ from the CPU's by {diffs[label]:.2e} (> {tol:g})")
        return {"scan": str(scan), "shape": list(reference.shape), "max_rel_diff_vs_cpu": diffs}

    def cohort(self) -> dict:
        from benchmarks import cohort

        s = self.sizes
        result = cohort.run(self.work / "cohort", volumes=s["cohort_volumes"], shape=s["cohort_shape"],
                            workers=(s["cohort_workers"],), ranks=(), device=self.device, size=s["cohort_size"],
                            env=self.env, log=self.log, timeout=self.timeout("cohort") / 2)
        (row,) = result["rows"]
        if not row["ok"]:
            raise StepFailed(row["error"][-500:])
        if row["forwards"] != s["cohort_volumes"]:
            raise StepFailed(f"{row['forwards']} forwards for {s['cohort_volumes']} volumes")
        return {"volumes": row["volumes"], "shape_xyz": result["shape_xyz"], "workers": row["workers"],
                "volumes_per_s": row["volumes_per_s"], "gpu_busy_share" if self.gpu else "network_busy_share":
                row["network_busy_share"], "peak_rss_gb": round(row["peak_rss_bytes"] / 1e9, 2), "wall_s": row["wall_s"]}

    def benchmark(self) -> dict:
        bench = self.out / "bench"
        command = [sys.executable, "-m", "benchmarks", "--device", self.device, "--sections", "forward,train",
                   "--out", bench]
        command += ["--quick"] if self.args.quick else ["--same-process", "--repeats", "10", "--no-compile"]
        self.run(command, timeout=self.timeout("benchmark"))
        report = json.loads((bench / "benchmark.json").read_text())
        failed = [r for sec in report["results"].values() for r in sec.get("rows", []) if not r.get("ok", True)]
        if failed:
            raise StepFailed(f"{len(failed)} benchmark row(s) failed: {failed[0].get('error', '')[:300]}")
        rows = report["results"]["forward"]["rows"]
        return {"peak": report["results"]["forward"].get("peak"),
                "forward": [{k: r.get(k) for k in ("arch", "shape", "variant", "median_s", "gflops", "max_rel_diff")}
                            for r in rows],
                "train": [{k: r.get(k) for k in ("what", "samples_per_s", "steps_per_s")}
                          for r in report["results"]["train"]["rows"]]}

    def all(self) -> int:
        for name, fn in [("environment", self.environment), ("cuda_tests", self.cuda_tests),
                         ("cotrain_resume", self.cotrain_resume), ("cotrain_2proc", self.cotrain_2proc),
                         ("finetune_seg", lambda: self.finetune("seg")), ("finetune_cls", lambda: self.finetune("cls")),
                         ("features", self.features), ("cohort", self.cohort), ("benchmark", self.benchmark)]:
            if self.args.steps and name not in self.args.steps:
                continue
            self.step(name, fn)
        self.summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.write_summary()
        passed = sum(s["ok"] for s in self.summary["steps"])
        self.log(f"\n{passed} passed, {len(self.summary['steps']) - passed} failed "
                 f"({self.summary['seconds']:.0f} s); summary in {self.out / 'device_check.json'}")
        if not self.args.keep:
            import shutil

            shutil.rmtree(self.work, ignore_errors=True)
        return 0 if self.summary["all_passed"] else 1


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def nilearn_mni152() -> str | None:
    """nilearn's MNI152 T1 template file, where nilearn is installed."""
    try:
        from nilearn import datasets
    except ImportError:
        return None
    return getattr(datasets, "MNI152_FILE_PATH", None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the check proper) or cpu (the dry run: gloo, no AMP)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, same steps (the CPU dry run)")
    p.add_argument("--out", default=os.environ.get("OUT") or "device-check-out", help="folder for the summary and the log")
    p.add_argument("--scan", help="a NIfTI scan for the features step (default: nilearn's MNI152 T1 template)")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for all steps (default 570)")
    p.add_argument("--steps", type=lambda t: t.split(","), help="run only these steps (comma-separated)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    return Check(args).all()


if __name__ == "__main__":
    raise SystemExit(main())
