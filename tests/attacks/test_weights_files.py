"""Cases 8, 9, 10 and what holds today: malicious pickles, corrupt and lying weight files, tampering, kill -9."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from medicalnet_files import entry, medicalnet_bytes, state_dict_of, tampered, write_manifest
from safetensors.torch import save_file

import med3d_hub
from med3d_hub.cli import app as cli
from med3d_hub.weights import hub
from med3d_hub.weights.checkpoints import CheckpointMismatchError

REPO = "med3d-test/MedicalNet-Resnet10"
FILE = "resnet_10.pth"


def safetensors_of(tmp_path: Path, name: str = "w.safetensors", dtype=torch.float32) -> tuple[Path, dict]:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict_of(medicalnet_bytes()).items()}
    save_file(state, str(tmp_path / name))
    return tmp_path / name, state


# -- case 8: corrupt or lying files and manifests are user errors -------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "lying header", "garbage"])
def test_a_damaged_safetensors_file_is_a_user_error_naming_the_file(tmp_path, capsys, damage):
    path, _ = safetensors_of(tmp_path)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "lying header":
        path.write_bytes((10**7).to_bytes(8, "little") + raw[8:])
    else:
        path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointMismatchError, match=str(path)):
        med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0)
    import numpy as np

    np.save(tmp_path / "scan.npy", np.zeros((8, 8, 8), np.float32))
    assert cli.main(["features", str(tmp_path / "scan.npy"), "-o", str(tmp_path / "f.npy"), "--pretrained", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "internal error" not in err


@pytest.mark.parametrize("field, value", [("model", {"name": "resnet10"}), ("source", [1, 2]),
                                          ("preprocess", {"intensity": {"method": {"a": 1}}}), ("shortcut", ["B"]),
                                          ("source", {"paper": "p", "datasets": [], "model_kwargs": [1]})])
def test_a_manifest_with_wrong_types_exits_2_naming_the_file(tmp_path, monkeypatch, capsys, field, value):
    raw = entry("resnet10", "bad", medicalnet_bytes())
    raw[field] = value
    path = write_manifest(tmp_path / "m.json", raw)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(path))
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "internal error" not in err


def test_a_manifest_nested_deeper_than_json_can_read_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 20_000 + "]" * 20_000)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(path))
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert f"{path} nests its JSON deeper than it can be read" in err and '"weights": [...]' in err, err
    assert "internal error" not in err and "RecursionError" not in err


# -- case 9: float16 weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_in_another_precision_load_as_float32_and_run(tmp_path, dtype):
    path, state = safetensors_of(tmp_path, dtype=dtype)
    model = med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.conv1.weight, state["conv1.weight"].float())
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 16, 16, 16)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_weights_with_integer_tensors_are_a_user_error_naming_the_file_and_tensors(tmp_path, capsys, dtype):
    """A quantised or bogus file: refused by name (exit 2), not torch's "only floating point can require gradients"."""
    path, state = safetensors_of(tmp_path, "int_weights.safetensors", dtype=torch.float32)
    save_file({k: v.to(dtype) if k.startswith("layer1.") else v for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointMismatchError, match="hold integer tensors") as caught:
        med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0)
    assert str(path) in str(caught.value) and f"layer1.0.bn1.bias ({str(dtype)[6:]})" in str(caught.value)

    import numpy as np

    np.save(tmp_path / "scan.npy", np.zeros((8, 8, 8), np.float32))
    assert cli.main(["features", str(tmp_path / "scan.npy"), "-o", str(tmp_path / "f.npy"), "--pretrained", str(path)]) == 2
    err = capsys.readouterr().err
    assert "int_weights.safetensors hold integer tensors" in err and "internal error" not in err


# -- held: malicious pickles and tampering ----------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MED3D_PWNED', '/nonexistent/pwned')}",))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MED3D_PWNED", str(marker))
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": {"conv1.weight": _Payload()}}, protocol=2))
    with pytest.raises(CheckpointMismatchError, match="weights_only"):
        med3d_hub.create_model("resnet10", pretrained=str(path), num_classes=0)
    assert not marker.exists()


def test_tampered_bytes_from_the_hub_are_refused_and_not_kept(env, tmp_path, monkeypatch, hf_cache, our_cache):
    data = medicalnet_bytes()
    env.add_file(REPO, FILE, data)
    env.serve_corrupted(REPO, FILE, tampered(data))
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet10", "t", data))))
    with pytest.raises(hub.ChecksumError):
        med3d_hub.create_model("resnet10.t", pretrained=True, num_classes=0)
    leftovers = [p for p in list(hf_cache.rglob("*")) + list(our_cache.rglob("*")) if p.is_file() and p.stat().st_size > 10_000]
    assert leftovers == []


# -- case 10: temporary files of killed processes ----------------------------------------------------------


def _age(path: Path, hours: float) -> None:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def test_stale_temporaries_are_removed_on_the_next_load_and_live_ones_kept(env, tmp_path, monkeypatch, hf_cache, our_cache):
    from filelock import FileLock

    data = medicalnet_bytes()
    sha = hashlib.sha256(data).hexdigest()
    env.add_file(REPO, FILE, data)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet10", "t", data))))
    blobs = hf_cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    (our_cache / "weights").mkdir(parents=True)
    (our_cache / "downloads" / sha).mkdir(parents=True)
    blobs.mkdir(parents=True)
    stale = [our_cache / "weights" / f".{sha}.safetensors.0badc0de.incomplete",
             our_cache / "downloads" / sha / f".{FILE}.0badc0de.incomplete",
             blobs / f"{'e' * 64}.incomplete"]
    recent = our_cache / "weights" / f".{'f' * 64}.safetensors.12345678.incomplete"
    locked = blobs / f"{'d' * 64}.incomplete"
    for path in [*stale, recent, locked]:
        path.write_bytes(b"0" * 4096)
    for path in [*stale, locked]:
        _age(path, 48)
    lock = hf_cache / ".locks" / blobs.parent.name / f"{'d' * 64}.lock"
    lock.parent.mkdir(parents=True)
    with FileLock(str(lock)):  # a download in progress in another process (its lock is held)
        med3d_hub.create_model("resnet10.t", pretrained=True, num_classes=0)
    assert [p for p in stale if p.exists()] == []
    assert recent.exists() and locked.exists()


@pytest.mark.slow
def test_kill_9_during_conversion_leaves_a_cache_the_next_run_trusts(tmp_path, monkeypatch):
    """Four processes convert the same local file; two are killed mid-way; a fifth loads the right weights."""
    data = medicalnet_bytes("resnet50")
    pth = tmp_path / "resnet_50.pth"
    pth.write_bytes(data)
    env = {**os.environ, "MED3D_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    code = f"import med3d_hub; med3d_hub.create_model('resnet50', pretrained={str(pth)!r}, num_classes=0)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(4)]
    time.sleep(4)
    for p in procs[:2]:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=300)
    assert [p.returncode for p in procs[2:]] == [0, 0]
    done = subprocess.run([sys.executable, "-c", code + "\nprint('ok')"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    for name in ("MED3D_HUB_CACHE", "HF_HOME"):
        monkeypatch.setenv(name, env[name])
    checked = hub.verify_cache(hub.settings(), remove=False)
    assert checked and all(problem is None for _, problem in checked)
