"""The GPU device check's dry run on the CPU: every step of benchmarks/device_check.py, tiny sizes, gloo.

The check itself runs on a lent GPU machine (docs/performance.md, GPU); this keeps its code
working between such runs. It takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai")
pytest.importorskip("nibabel")
pytest.importorskip("nilearn")  # the features step's scan: nilearn's MNI152 template

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "cuda_tests", "cotrain_resume", "cotrain_2proc", "finetune_seg", "finetune_cls", "features",
         "cohort", "benchmark"]


@pytest.mark.slow  # 3.5 minutes on a quiet 2-core machine; most steps are tested on their own. Run it before a GPU run
@pytest.mark.timeout(1800)
def test_the_cpu_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(out), "--device", "cpu", "--quick",
                           "--budget", "1500"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "device_check.json").read_text())
    failed = {s["name"]: s.get("error") for s in summary["steps"] if not s["ok"]}
    assert done.returncode == 0 and summary["all_passed"], (failed, done.stdout[-6000:], done.stderr[-3000:])
    assert [s["name"] for s in summary["steps"]] == STEPS
    steps = {s["name"]: s for s in summary["steps"]}
    assert all(s["seconds"] > 0 for s in summary["steps"])
    resumed = steps["cotrain_resume"]["details"]
    assert resumed["backend"] == "gloo" and 0 < resumed["killed_after_step"] < 16
    assert resumed["losses"][-1] < resumed["losses"][0]
    assert steps["cotrain_2proc"]["details"]["backend"] == "gloo"
    assert "passed" in steps["cuda_tests"]["details"]["pytest"]
    assert steps["features"]["details"]["max_rel_diff_vs_cpu"]["cpu fp32"] == 0.0
    assert {r["variant"] for r in steps["benchmark"]["details"]["forward"]} >= {"upstream", "default", "fast"}
    log = (out / "device_check.log").read_text()
    cohort = steps["cohort"]["details"]
    assert cohort["workers"] == 2 and cohort["volumes_per_s"] > 0 and 0 < cohort["network_busy_share"] <= 1
    assert "resume:" in log and "9 passed, 0 failed" in log
    bench = json.loads((out / "bench" / "benchmark.json").read_text())
    assert set(bench["results"]) == {"forward", "train"}
