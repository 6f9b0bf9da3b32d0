"""Cohort runs of `med3d features`: torchrun over 2 CPU ranks, the parts folder, --resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from med3d_hub.inference.feature_files import load_features
from med3d_hub.inference.parts import input_key
from scan_files import med3d_env, run_med3d

TINY = ["--pretrained", "none", "--size", "16", "32", "32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Nine small volumes of different shapes and contents, as .npy scans."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    scans = []
    for i in range(9):
        path = root / f"scan{i}.npy"
        np.save(path, rng.gamma(2.0 + i, size=(12 + i, 20, 18 + i)).astype(np.float32))
        scans.append(str(path))
    return root, scans


def _same_features(a: Path, b: Path) -> None:
    first, second = load_features(a), load_features(b)
    assert first.names == second.names
    np.testing.assert_allclose(first.features, second.features, rtol=1e-5, atol=1e-6)
    assert first.provenance == second.provenance


def test_torchrun_on_two_cpu_ranks_writes_the_single_process_file(cohort, tmp_path):
    root, scans = cohort
    env = med3d_env(tmp_path, OMP_NUM_THREADS="1")
    alone = run_med3d("features", *scans, *TINY, "-o", tmp_path / "alone.npz", env=env)
    assert alone.returncode == 0, alone.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "med3d_hub.features", *scans, *TINY, "-o", str(tmp_path / "ranks.npz")]
    ranks = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stdout + ranks.stderr
    _same_features(tmp_path / "alone.npz", tmp_path / "ranks.npz")
    assert load_features(tmp_path / "ranks.npz").names == scans  # rows in input order, not rank order
    assert not (tmp_path / "ranks.npz.parts").exists()  # assembled, then removed


def test_sigkill_then_resume_gives_the_uninterrupted_file_and_computes_only_the_rest(tmp_path):
    rng = np.random.default_rng(1)
    scans = []
    for i in range(16):  # long enough to be stopped part-way
        scans.append(str(tmp_path / f"ct{i:02d}.npy"))
        np.save(scans[-1], rng.gamma(3.0, size=(14, 18 + i % 4, 20)).astype(np.float32))
    env = med3d_env(tmp_path, OMP_NUM_THREADS="1")
    whole = run_med3d("features", *scans, *TINY, "-o", tmp_path / "whole.csv", env=env)
    assert whole.returncode == 0, whole.stderr

    output, parts = tmp_path / "killed.csv", tmp_path / "killed.csv.parts"
    proc = subprocess.Popen([sys.executable, "-m", "med3d_hub", "features", *scans, *TINY, "-o", str(output)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.npz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not output.exists()
    done = len(list(parts.glob("*.npz")))
    assert 3 <= done < len(scans)

    again = run_med3d("features", *scans, *TINY, "-o", output, env=env)  # without --resume: refused, nothing lost
    assert again.returncode == 2 and "--resume" in again.stderr
    assert len(list(parts.glob("*.npz"))) == done
    verbose = [a for a in TINY if a != "-q"]
    resumed = run_med3d("features", *scans, *verbose, "-o", output, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({done} from killed.csv.parts, {len(scans) - done} computed now)" in resumed.stdout, resumed.stdout
    (names, values), (whole_names, whole_values) = _rows(output), _rows(tmp_path / "whole.csv")
    assert names == whole_names == ["file", *scans]
    np.testing.assert_allclose(values, whole_values, rtol=1e-5, atol=1e-6)
    assert not parts.exists()


def _rows(path: Path) -> tuple[list[str], np.ndarray]:
    """A CSV's first column (header included) and its numbers."""
    lines = [line.split(",") for line in path.read_text().splitlines()]
    return [r[0] for r in lines], np.array([[float(v) for v in r[1:]] for r in lines[1:]])


def test_resume_recomputes_only_what_is_missing_and_refuses_another_model(cohort, tmp_path):
    root, scans = cohort
    env = med3d_env(tmp_path, OMP_NUM_THREADS="1")
    output, parts = tmp_path / "f.npz", tmp_path / "f.npz.parts"
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not an array")
    inputs = [*scans[:4], str(broken)]
    first = run_med3d("features", *inputs, *TINY, "-o", output, env=env)
    assert first.returncode == 1 and "broken.npy" in first.stderr
    kept = {p.name: p.stat().st_ino for p in parts.glob("*.npz")}
    assert len(kept) == 4  # the four readable scans stay in the parts folder for --resume

    other = run_med3d("features", *inputs, *TINY, "--seed", "1", "--resume", "-o", output, env=env)
    assert other.returncode == 2 and "parameters_sha256" in other.stderr  # another model: refused, not mixed
    assert {p.name: p.stat().st_ino for p in parts.glob("*.npz")} == kept

    np.save(broken, np.ones((14, 20, 20), np.float32))  # fixed: a new size and mtime, a new key
    verbose = [a for a in TINY if a != "-q"]
    fixed = run_med3d("features", *inputs, *verbose, "--resume", "-o", output, env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert re.search(r"\(4 from f\.npz\.parts, 1 computed now\)", fixed.stdout), fixed.stdout
    assert not parts.exists()
    reference = run_med3d("features", *inputs, *TINY, "-o", tmp_path / "ref.npz", env=env)
    assert reference.returncode == 0
    _same_features(output, tmp_path / "ref.npz")


def test_an_input_key_follows_the_file(tmp_path):
    scan = tmp_path / "a.npy"
    np.save(scan, np.zeros((4, 4, 4), np.float32))
    key = input_key(scan)
    assert input_key(str(scan)) == key
    os.utime(scan, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert input_key(scan) != key  # touched or replaced since: computed again


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """real/ and fake/: five small volumes each, the fake ones noisier."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(2)
    for folder, noise in (("real", 0.1), ("fake", 1.0)):
        (root / folder).mkdir()
        for i in range(5):
            base = rng.gamma(3.0, size=(14, 20, 20)) + noise * rng.normal(size=(14, 20, 20))
            np.save(root / folder / f"v{i}.npy", base.astype(np.float32))
    return root


FID_ARGS = ["--pretrained", "none", "--size", "16", "32", "32", "--device", "cpu", "-q", "--kid-subset-size", "3"]


def _scores(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {"fid": report["fid"], "kid": report["kid"]["mean"], "mmd": report["mmd2_linear"],
            "sets": [s["volumes"] for s in report["sets"]]}


@pytest.fixture(scope="module")
def fid_alone(two_sets, tmp_path_factory) -> dict:
    """The scores of real/ against fake/ from one process."""
    tmp = tmp_path_factory.mktemp("fid-alone")
    alone = run_med3d("fid", str(two_sets / "real"), str(two_sets / "fake"), *FID_ARGS, "--json", tmp / "alone.json",
                      env=med3d_env(tmp, OMP_NUM_THREADS="1"))
    assert alone.returncode == 0, alone.stderr
    return _scores(tmp / "alone.json")


@pytest.mark.slow
def test_fid_on_two_ranks_merges_their_statistics_into_the_single_process_score(two_sets, fid_alone, tmp_path):
    env = med3d_env(tmp_path, OMP_NUM_THREADS="1")
    sets = [str(two_sets / "real"), str(two_sets / "fake")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "med3d_hub.fid", *sets, *FID_ARGS, "--json", str(tmp_path / "ranks.json"),
               "--features-dir", str(tmp_path)]
    ranks = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stdout + ranks.stderr
    one, two = fid_alone, _scores(tmp_path / "ranks.json")
    assert two["sets"] == one["sets"] == [5, 5] and one["fid"] > 0
    for key in ("fid", "kid", "mmd"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
    assert load_features(tmp_path / "set1.npz").names == sorted(str(p) for p in (two_sets / "real").iterdir())


@pytest.mark.slow
def test_fid_keeps_the_features_it_read_and_resumes(two_sets, fid_alone, tmp_path):
    env = med3d_env(tmp_path, OMP_NUM_THREADS="1")
    fake = tmp_path / "fake"
    shutil.copytree(two_sets / "fake", fake)
    good = (fake / "v3.npy").read_bytes()
    (fake / "v3.npy").write_bytes(b"broken")
    kept = tmp_path / "features"
    kept.mkdir()
    args = [str(two_sets / "real"), str(fake), *FID_ARGS, "--features-dir", str(kept)]
    failed = run_med3d("fid", *args, "--json", tmp_path / "scores.json", env=env)
    assert failed.returncode == 2 and "v3.npy" in failed.stderr  # an incomplete set is not scored
    assert not (tmp_path / "scores.json").exists()
    first_set = (kept / "set1.npz").stat().st_ino
    assert len(list((kept / "set2.npz.parts").glob("*.npz"))) == 4  # the scans read are kept

    (fake / "v3.npy").write_bytes(good)
    resumed = run_med3d("fid", *args, "--resume", "--json", tmp_path / "scores.json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert (kept / "set1.npz").stat().st_ino == first_set  # the finished set is read back, not recomputed
    scores = _scores(tmp_path / "scores.json")
    assert scores.pop("sets") == fid_alone["sets"]
    assert scores == pytest.approx({k: v for k, v in fid_alone.items() if k != "sets"}, rel=1e-5, abs=1e-9)


def _bash_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a page, in order (```text blocks need weights, GPUs or a cluster)."""
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S)


@pytest.mark.slow
def test_the_cohort_page_runs_as_written(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(3)
    for folder, count in (("scans", 6), ("real", 4), ("synthetic", 4)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            data = rng.gamma(3.0, size=(20, 22, 14)).astype(np.float32) * (1 + (folder == "synthetic"))
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / folder / f"s{i}.nii.gz"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "med3d").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m med3d_hub "$@"\n')
    (bin_dir / "med3d").chmod(0o755)
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = med3d_env(tmp_path, OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    blocks = _bash_blocks(Path(__file__).resolve().parents[1] / "docs" / "cohort.md")
    assert len(blocks) >= 5
    for block in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, (block, done.stdout[-2000:], done.stderr[-2000:])
    assert len((tmp_path / "scans.txt").read_text().splitlines()) == 6
    _same_features(tmp_path / "dry-run.npz", tmp_path / "dry-run-2.npz")
    assert json.loads((tmp_path / "scores.json").read_text())["fid"] == pytest.approx(
        json.loads((tmp_path / "again.json").read_text())["fid"], rel=1e-6)
