"""What a new user meets first: reproducible random weights, messages that name the real problem,
and huggingface_hub's progress bar on weight downloads (hidden by --quiet)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")

from hub_server import HubServer  # noqa: E402
from scan_files import ROOT, closed_endpoint, manifest_entry, med3d_env, medicalnet_pth, run_med3d, write_manifest  # noqa: E402
from skips import needs  # noqa: E402

from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.cli import training  # noqa: E402
from med3d_hub.weights.hub import HubUnreachableError  # noqa: E402

SMALL = ["--size", "16", "32", "32"]


@pytest.fixture
def scan(tmp_path) -> str:
    path = tmp_path / "scan.npy"
    np.save(path, np.random.default_rng(0).random((20, 24, 24), dtype=np.float32))
    return str(path)


@pytest.fixture
def offline(tmp_path, hf_cache, monkeypatch):
    """main() with a Hub endpoint nothing listens on."""
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint())


# -- random weights are reproducible ---------------------------------------------------------------


def test_random_weight_features_are_the_same_on_every_run(scan, tmp_path):
    env = med3d_env(tmp_path)
    outputs, warnings = [], []
    for run_id, seed in (("a", []), ("b", []), ("c", ["--seed", "1"])):
        out = tmp_path / f"{run_id}.csv"
        run = run_med3d("features", scan, "--pretrained", "none", *SMALL, *seed, "-o", out, env=env)
        assert run.returncode == 0, run.stderr
        outputs.append(out.read_bytes())
        warnings.append(run.stderr)
    assert "RANDOM weights (--seed 0)" in warnings[0] and "RANDOM weights (--seed 1)" in warnings[2]
    assert outputs[0] == outputs[1]  # two runs, the same file byte for byte
    assert outputs[0] != outputs[2]  # another seed, other weights


# -- messages that name the real problem ----------------------------------------------------------


def test_missing_input_is_reported_before_the_weights(offline, tmp_path, capsys):
    code = cli.main(["features", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "f.npy")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("med3d: error: no such file or folder: ") and "missing.nii.gz" in err
    assert "Hub" not in err and "Ways out" not in err

    code = cli.main(["demo", "--scan", str(tmp_path / "missing.nii.gz"), "--out-dir", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == 2 and "no such file or folder" in err and "Ways out" not in err, err


def test_a_text_file_as_weights_is_named_as_such(offline, scan, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("remember to check the scans\n")
    code = cli.main(["features", scan, "--pretrained", str(notes), "-o", str(tmp_path / "f.npy")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "notes.txt is not a weights file" in err and "b'remember'" in err and "torch.load" not in err

    # A real checkpoint still loads.
    weights = medicalnet_pth(tmp_path / "resnet_10.pth")
    assert cli.main(["features", scan, "--pretrained", str(weights), *SMALL, "-o", str(tmp_path / "f.npy")]) == 0


def test_from_scratch_is_offered_as_a_baseline_to_finetune():
    err = HubUnreachableError("could not reach the Hub at http://127.0.0.1:9.")
    finetune = cli.unreachable_message(err, "finetune")
    assert "--pretrained none (the paper's baseline" in finetune and "mean nothing" not in finetune
    assert "the features mean nothing" in cli.unreachable_message(err, "features")


@pytest.mark.parametrize("argv", [
    ["finetune", "seg", "--data", "Task03_Liver", "--model", "resnet50", "--pretrained", "3dseg8", "--output", "runs/liver"],
    ["train", "--config", "configs/3dseg8.yaml", "--data-root", "/data/msd", "--output", "runs/3dseg8-r50"],
    ["compare", "runs/liver", "runs/liver-scratch"],
])
def test_training_commands_without_the_train_extra_say_what_to_install(argv, tmp_path, monkeypatch, capsys):
    """With the `io` extra only (README, "Smaller installs") MONAI is missing: a usage error naming the extra."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "monai", None)  # how Python marks a module as not importable
    assert not training.train_available()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"med3d: error: `med3d {argv[0]}` needs the train extra, and monai is not installed: "
        "pip install 'med3d-hub[train]' (from a clone: pip install -e \".[io,train]\")"
    )
    assert not (tmp_path / "runs").exists()


def test_train_errors_name_the_folder_problem_with_the_prefix(tmp_path, capsys):
    needs(training.train_available(), "the training extra", "pip install 'med3d-hub[train]'")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    code = cli.main(["train", "--data", str(empty), "--output", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("med3d: error: ") and "not an MSD task folder" in last and "'labels'" not in last

    images_only = tmp_path / "Task01_Only"
    (images_only / "imagesTr").mkdir(parents=True)
    (images_only / "imagesTr" / "a.nii.gz").write_bytes(b"")
    code = cli.main(["train", "--data", str(images_only), "--output", str(tmp_path / "run2"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("med3d: error: ") and "has no dataset.json to take the labels" in err

    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "med3d train --config" in out


def test_list_estimates_a_size_the_manifest_leaves_unknown(capsys):
    assert cli.main(["list", "resnet152"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resnet152.3dseg8"))
    assert "~470.0 MB" in row  # 117.5 M float32 parameters; the file is about 470 MB
    assert cli.main(["list", "resnet50"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resnet50.3dseg8"))
    assert " MB" in row and "~" not in row  # known sizes are shown as they are


# -- the download progress bar --------------------------------------------------------------------


def run_on_terminal(argv: list[str], env: dict, timeout: float = 180) -> tuple[int, str]:
    """Run a command with stderr on a pseudo-terminal of 120 columns; return (exit code, stderr)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    try:
        while select.select([master], [], [], timeout)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


@pytest.fixture
def served_weights(tmp_path):
    data = medicalnet_pth(tmp_path / "resnet_10.pth").read_bytes()
    recipe = {"spacing": None, "intensity": {"method": "nonzero_zscore"}, "crop_foreground": True,
              "size": [16, 32, 32], "size_mode": "resize"}
    with HubServer() as server:
        server.add_file("med3d-test/MedicalNet-Resnet10", "resnet_10.pth", data)
        manifest = write_manifest(tmp_path / "weights.json", manifest_entry("testhub", data, recipe))
        yield server, manifest


def _terminal_env(tmp_path: Path, server: HubServer, manifest: Path, home: str) -> dict:
    env = med3d_env(tmp_path, HF_ENDPOINT=server.endpoint, MED3D_HUB_MANIFEST=str(manifest),
                    HF_HOME=str(tmp_path / home))
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS")
    return env


def test_weight_downloads_show_the_hub_progress_bar_unless_quiet(served_weights, tmp_path):
    server, manifest = served_weights
    med3d = [sys.executable, "-m", "med3d_hub"]

    code, err = run_on_terminal([*med3d, "download", "resnet10"], _terminal_env(tmp_path, server, manifest, "a"))
    assert code == 0, err
    assert "resnet_10.pth" in err and "100%" in err

    code, err = run_on_terminal([*med3d, "download", "resnet10", "-q"], _terminal_env(tmp_path, server, manifest, "b"))
    assert code == 0, err
    assert "100%" not in err

    python = ("import med3d_hub; m = med3d_hub.create_model('resnet10', pretrained=True); "
              "print(m.pretrained_cfg['name'])")
    code, err = run_on_terminal([sys.executable, "-c", python], _terminal_env(tmp_path, server, manifest, "c"))
    assert code == 0, err
    assert "resnet_10.pth" in err and "100%" in err


def test_the_repository_address_is_set_once():
    """pyproject.toml's Repository URL is the one address; the README, hubconf.py and the docs use it."""
    import re

    address = re.search(r'^Repository = "(https://github.com/[^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    owner_repo = address.removeprefix("https://github.com/")
    for name in ("README.md", "hubconf.py", "docs/pretrained.md"):
        text = (ROOT / name).read_text()
        assert "<owner>" not in text and f'torch.hub.load("{owner_repo}"' in text, name
    for name in ("README.md", "docs/getting-started.md"):
        assert f"git clone {address}" in (ROOT / name).read_text(), name
