"""The benchmark command runs end to end in its quick mode and its paths agree (no timing assertions).

Also the one loading shortcut the benchmark made visible: a local weights file is hashed once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nibabel")
pytest.importorskip("nilearn")
pytest.importorskip("monai")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text(), proc.stdout


def test_quick_run_writes_json_and_markdown(quick_report):
    out, report, markdown, stdout = quick_report
    assert report["quick"] is True
    assert set(report["results"]) == {"forward", "load", "features", "train", "cohort", "memory"}
    assert report["machine"]["threads"] >= 1 and report["machine"]["torch"]
    for name, section in report["sections"].items():
        assert len(section["load_before"]["loadavg"]) == 3, name
    for heading in ("### Forward", "### Loading weights", "### `med3d features`", "### Co-training", "### Cohort", "### Peak memory",
                    "### Targets"):
        assert heading in markdown
    assert "load average" in stdout


def test_every_measurement_ran(quick_report):
    _, report, _, _ = quick_report
    failed = [(name, r.get("error")) for name, sec in report["results"].items() for r in sec["rows"] if not r["ok"]]
    assert not failed


def test_forward_paths_agree_with_the_upstream_style_baseline(quick_report):
    _, report, _, _ = quick_report
    rows = report["results"]["forward"]["rows"]
    assert {r["variant"] for r in rows} >= {"upstream", "default", "fast"}
    if importlib.util.find_spec("onnxruntime"):  # the [deploy] extra: the ONNX file beside the fast path, same inputs
        assert {r["variant"] for r in rows if r["arch"] == "resnet10"} >= {"fast", "onnx"}
    assert {r["arch"] for r in rows} == {"resnet10", "resnet50"}
    assert report["results"]["forward"]["peak"]["float32_gflops"] > 0  # the ceiling the forward rows are read against
    for r in rows:
        assert r["median_s"] > 0 and r["macs_real"] <= r["macs_nominal"]
        if r["variant"] != "fast_bf16":
            assert r["max_rel_diff"] <= 1e-4, r


def test_loaded_weights_agree(quick_report):
    _, report, _, _ = quick_report
    rows = [r for r in report["results"]["load"]["rows"] if r["variant"] != "random"]
    assert {r["variant"] for r in rows} == {"upstream", "named", "file", "first"}
    assert all(r["weights_match"] for r in rows)


def test_features_and_training_ran(quick_report):
    _, report, _, _ = quick_report
    (features,) = report["results"]["features"]["rows"]
    assert features["output_ok"] and features["volumes"] == 2 and 0 <= features["outside_share"] <= 1
    step, loader = report["results"]["train"]["rows"]
    assert step["steps_per_s"] > 0 and loader["samples_per_s"] > 0


def test_the_cohort_ran_over_workers_and_ranks(quick_report):
    _, report, markdown, _ = quick_report
    cohort = report["results"]["cohort"]
    rows = {(r["workers"], r["ranks"], r["torchrun"]): r for r in cohort["rows"]}
    assert set(rows) == {(1, 1, False), (2, 1, False), (1, 1, True), (1, 2, True)}
    for r in rows.values():
        assert r["forwards"] == cohort["volumes"]  # every volume once, over all the ranks
        assert 0 <= r["network_waits_share"] <= 1 and r["peak_rss_bytes"] > 0
    assert len(rows[(1, 2, True)]["peak_rss_per_rank"]) == 2
    assert "torchrun, 2 rank(s)" in markdown


def test_memory_is_measured_over_the_process_tree(quick_report):
    _, report, _, _ = quick_report
    (row,) = report["results"]["memory"]["rows"]
    assert row["ok"] and row["workers"] == 1 and row["processes"] >= 1
    assert 0 < row["peak_pss_bytes"] <= row["peak_rss_sum_bytes"] <= row["sum_of_process_peaks_bytes"] * 1.01
    assert report["results"]["memory"]["verdict"]["one_worker_bytes"] == row["peak_pss_bytes"]


def test_a_local_weights_file_is_hashed_once_until_it_changes(tmp_path, hf_cache, monkeypatch):
    import med3d_hub
    from med3d_hub.weights import hub, pretrained
    from medicalnet_files import medicalnet_bytes, tampered

    calls = []
    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(pretrained, "_HASH_MEMO_MIN_AGE_S", -1.0)  # remember even a file written just now
    monkeypatch.delenv("MED3D_HUB_CACHE", raising=False)
    path = tmp_path / "resnet_10.pth"
    path.write_bytes(medicalnet_bytes("resnet10"))
    first = med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0)
    second = med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0)
    assert len(calls) == 1
    assert first.pretrained_cfg["sha256"] == second.pretrained_cfg["sha256"]
    path.write_bytes(tampered(path.read_bytes()))  # same size, new content: a new ctime, hashed again
    third = med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0)
    assert len(calls) == 2 and third.pretrained_cfg["sha256"] != first.pretrained_cfg["sha256"]
