"""Export and publish trained weights against the Hub test server: uploads, the fresh-process round
trip, refusals that leave the manifest untouched, the model card, and the token kept secret.

One tiny co-training run (resnet10, two synthetic MSD tasks, 16^3 crops, 2 steps) serves every test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")
yaml = pytest.importorskip("yaml")

from hub_server import HangingServer, HubServer, closed_port_endpoint, use_endpoint  # noqa: E402
from medicalnet_files import entry as medicalnet_entry  # noqa: E402
from medicalnet_files import medicalnet_bytes, write_manifest  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import med3d_hub  # noqa: E402
from med3d_hub.cli import app as cli  # noqa: E402
from med3d_hub.errors import EXIT_PUBLISH_FAILED, EXIT_UNREACHABLE, EXIT_USAGE  # noqa: E402
from med3d_hub.publishing import publish as publish_module  # noqa: E402
from med3d_hub.publishing.export import export  # noqa: E402
from med3d_hub.publishing.run import RunError, read_run  # noqa: E402
from med3d_hub.publishing.publish import fixed_input, publish  # noqa: E402
from med3d_hub.weights import manifest  # noqa: E402

# huggingface_hub itself PUTs LFS bytes with httpx2's deprecated data=<file>.
pytestmark = [
    pytest.mark.hub,  # runs once per huggingface_hub generation (.ci/compat.sh)
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
REPO = "med3d-test/resnet10-cotrain"
SECRET = "hf_publish_test_secret_5d1c"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished co-training run: config.yaml, encoder.safetensors, metrics.jsonl, curves.png, checkpoints/."""
    from med3d_hub.train import main as train_main
    from med3d_hub.training.synthetic import make_synthetic_task

    root = tmp_path_factory.mktemp("tiny_run")
    tasks = [
        make_synthetic_task(root / "data", "Synth1", num_classes=2, num_cases=4, shape=(20, 24, 20), seed=1),
        make_synthetic_task(root / "data", "Synth2", num_classes=3, num_cases=4, shape=(20, 24, 20), seed=2),
    ]
    args = [a for t in tasks for a in ("--data", str(t))] + [
        "--model", "resnet10", "--steps", "2", "--crop", "16", "16", "16", "--batch-size", "1", "--device", "cpu",
        "--workers", "0", "--cache-dir", str(root / "cache"), "--output", str(root / "run"),
        "--set", "log_every=1", "--set", "val_every=2", "--set", "warmup_steps=0", "--set", "val_fraction=0.25",
    ]  # fmt: skip
    assert train_main(args) == 0
    return root / "run"


@pytest.fixture
def env(hf_cache, hub_server, monkeypatch):
    """The Hub server as HF_ENDPOINT, fresh caches, no extra manifests, no token."""
    use_endpoint(monkeypatch, hub_server.endpoint)
    for name in ("MED3D_HUB_MANIFEST", "MED3D_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(manifest, "_added", [])
    return hub_server


def _local_encoder(run_dir: Path) -> torch.nn.Module:
    model = med3d_hub.create_model("resnet10", num_classes=0)
    model.load_state_dict(load_file(str(run_dir / "encoder.safetensors")), strict=True)
    return model.eval()


def _fresh_process_outputs(tmp: Path, manifest_path: Path, name: str, kwargs: dict, in_chans: int) -> tuple[torch.Tensor, dict]:
    """Load ``name`` by name.tag through MED3D_HUB_MANIFEST in a new Python with empty caches; its output."""
    out = tmp / "fresh_output.safetensors"
    code = (
        "import torch, med3d_hub\n"
        "from safetensors.torch import save_file\n"
        "from med3d_hub.publishing.publish import fixed_input\n"
        f"m = med3d_hub.create_model({name!r}, pretrained=True, **{kwargs!r}).eval()\n"
        "assert m.pretrained_cfg['format'] == 'safetensors', m.pretrained_cfg\n"
        f"with torch.no_grad(): y = m(fixed_input({in_chans}))\n"
        f"save_file({{'y': y.contiguous()}}, {str(out)!r}, metadata={{'sha256': m.pretrained_cfg['sha256'], 'revision': m.pretrained_cfg['revision']}})\n"
    )
    env = dict(os.environ)
    env.update(MED3D_HUB_MANIFEST=str(manifest_path), HF_HUB_CACHE=str(tmp / "fresh_hf"), MED3D_HUB_CACHE=str(tmp / "fresh_med3d"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        return f.get_tensor("y"), dict(f.metadata())


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


# -- export -------------------------------------------------------------------------------------------


def test_export_writes_weights_config_card_and_record(run_dir, tmp_path):
    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), "--output", str(out), "--license", "MIT", "--medicalnet-pth",
                     "--repo-id", "org/r10", "--tag", "v1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "config.json", "curves.png", "metrics.jsonl", "model.safetensors", "resnet_10.pth",
        "training_config.yaml",
    ])  # fmt: skip

    # Weights: the zoo's backbone keys, the run's tensors, dense and sharing no bytes.
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two tensors share storage
    tensors, encoder = load_file(str(out / "model.safetensors")), load_file(str(run_dir / "encoder.safetensors"))
    assert set(tensors) == set(med3d_hub.create_model("resnet10", num_classes=0).state_dict()) == set(encoder)
    assert all(torch.equal(tensors[k], encoder[k]) and tensors[k].is_contiguous() for k in tensors)

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "med3d_resnet10" and config["depth"] == 10 and config["shortcut"] == "B"
    assert config["in_chans"] == 1 and config["num_classes"] == 0 and config["dilation"] == [1, 1, 2, 4]
    assert config["preprocess"]["intensity"]["method"] == "percentile_zscore" and config["preprocess"]["spacing"] is None

    # The card: Hub metadata that parses and carries the validation Dice of metrics.jsonl.
    card = (out / "README.md").read_text()
    _, front, prose = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["license"] == "mit" and meta["library_name"] == "med3d-hub"
    assert meta["datasets"] == ["Task92_Synth1", "Task93_Synth2"] and "medical-imaging" in meta["tags"]
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    results = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "resnet10.v1"
    assert {r["dataset"]["type"]: r["metrics"][0]["value"] for r in results} == {
        "task92_synth1": round(val["dice/Synth1"], 4), "task93_synth2": round(val["dice/Synth2"], 4)}
    assert all(r["metrics"][0]["type"] == "dice" and r["dataset"]["split"] == "validation" for r in results)
    for heading in ("## How to use", "## Training", "## Data", "## Results", "## Intended use", "## Limitations", "## Citation"):
        assert heading in prose
    assert "arXiv:1904.00625" in prose and "resnet10.v1" in prose and "org/r10" in prose

    # The training record, without local paths.
    training = (out / "training_config.yaml").read_text()
    assert str(tmp_path.parent) not in training and str(run_dir.parent) not in training
    assert yaml.safe_load(training)["tasks"][0]["path"] == "Task92_Synth1"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # MedicalNet's layout, for upstream code: module.-prefixed backbone under state_dict, read safely.
    pth = torch.load(out / "resnet_10.pth", weights_only=True)
    assert set(pth["state_dict"]) == {f"module.{k}" for k in encoder}
    loaded = med3d_hub.create_model("resnet10", pretrained=str(out / "resnet_10.pth"), num_classes=0)
    assert all(torch.equal(v, encoder[k]) for k, v in loaded.state_dict().items())


def test_export_is_reproducible_and_refuses_what_it_cannot_do(run_dir, tmp_path):
    run = read_run(run_dir)
    a, b = export(run, tmp_path / "a", license="mit"), export(run, tmp_path / "b", license="mit")
    assert a.sha256 == b.sha256 and (tmp_path / "a" / "README.md").read_text() == (tmp_path / "b" / "README.md").read_text()
    with pytest.raises(RunError, match="--license"):  # synthetic tasks state no licence
        export(run, tmp_path / "c")
    with pytest.raises(RunError, match="not an empty folder"):
        export(run, tmp_path / "a", license="mit")
    assert not (tmp_path / "c").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(RunError, match="is neither a co-training run"):
        read_run(tmp_path)


def test_a_checkpoint_can_be_exported_instead_of_the_final_encoder(run_dir):
    run = read_run(run_dir, checkpoint="latest")
    encoder = load_file(str(run_dir / "encoder.safetensors"))
    assert run.step == 2 and run.world_size == 1
    assert all(torch.equal(v, encoder[k]) for k, v in run.model.state_dict().items())


# -- publish ------------------------------------------------------------------------------------------


def test_publish_then_load_back_by_name_tag_in_a_fresh_process(run_dir, env, tmp_path, capsys):
    target = tmp_path / "weights.json"
    start = time.perf_counter()
    code = cli.main(["publish", str(run_dir), "--repo-id", REPO, "--tag", "cotrain-v1", "--manifest", str(target),
                     "--license", "mit", "--revision-message", "tiny co-training run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    elapsed = time.perf_counter() - start

    # One commit on top of the repo's initial one, holding every exported file.
    commits = env.commits(REPO)
    assert len(commits) == 2
    weights = env.file_bytes(REPO, "model.safetensors")
    for name in ("README.md", "config.json", "training_config.yaml", "metrics.jsonl", "curves.png"):
        assert env.file_bytes(REPO, name)

    entries = manifest.read_manifest(target)
    assert [e.name for e in entries] == ["resnet10.cotrain-v1"]
    e = entries[0]
    assert (e.hf_hub_id, e.revision, e.filename, e.format) == (REPO, commits[0], "model.safetensors", "safetensors")
    assert e.sha256 == _sha256(weights) and e.size == len(weights) and e.license == "mit"
    assert e.shortcut == "B" and e.in_chans == 1 and e.preprocess["intensity"]["method"] == "percentile_zscore"
    assert e.source["datasets"] == ["Synth1 (Task92_Synth1, synthetic)", "Synth2 (Task93_Synth2, synthetic)"]
    assert e.source["model_kwargs"] == {"num_classes": 0} and e.source["step"] == 2
    assert commits[0] in out and "bitwise equal" in out

    # An independent fresh process: name.tag -> pinned commit -> sha256 -> the local model's outputs.
    y, meta = _fresh_process_outputs(tmp_path, target, "resnet10.cotrain-v1", {"num_classes": 0}, 1)
    with torch.no_grad():
        assert torch.equal(y, _local_encoder(run_dir)(fixed_input(1)))
    assert meta == {"sha256": e.sha256, "revision": commits[0]}
    print(f"publish took {elapsed:.1f} s")


def test_an_existing_tag_is_refused_before_anything_is_sent_and_force_replaces_it(run_dir, env, tmp_path, capsys):
    data = medicalnet_bytes("resnet10")
    target = write_manifest(tmp_path / "weights.json", medicalnet_entry("resnet10", "other", data),
                            medicalnet_entry("resnet10", "taken", data))
    before = target.read_bytes()
    args = ["publish", str(run_dir), "--repo-id", REPO, "--tag", "taken", "--manifest", str(target), "--license", "mit"]
    assert cli.main(args) == EXIT_USAGE
    assert "already has resnet10.taken" in capsys.readouterr().err
    assert target.read_bytes() == before and env.requests == []

    assert cli.main(["publish", str(run_dir), "--repo-id", REPO, "--tag", "3dseg8", "--manifest", str(target),
                     "--license", "mit"]) == EXIT_USAGE  # a shipped release's name
    assert "package's own manifest" in capsys.readouterr().err
    assert target.read_bytes() == before and env.requests == []

    assert cli.main([*args, "--force", "-q"]) == 0
    entries = manifest.read_manifest(target)
    assert [e.tag for e in entries] == ["other", "taken"]  # replaced in place, the other entry kept
    assert entries[1].format == "safetensors" and entries[1].revision == env.commits(REPO)[0]


def test_nan_weights_and_loose_checkpoints_are_refused(run_dir, env, tmp_path, capsys):
    target = tmp_path / "weights.json"
    encoder = load_file(str(run_dir / "encoder.safetensors"))
    for case, change in [
        ("nan", lambda s: s.__setitem__("layer1.0.conv1.weight", s["layer1.0.conv1.weight"].clone().fill_(float("nan")))),
        ("inf", lambda s: s.__setitem__("bn1.running_var", torch.full_like(s["bn1.running_var"], float("inf")))),
        ("missing", lambda s: s.pop("layer4.0.bn2.weight")),
        ("extra", lambda s: s.__setitem__("fc.weight", torch.zeros(2, 512))),
    ]:
        bad = tmp_path / case
        bad.mkdir()
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copy(run_dir / name, bad / name)
        state = dict(encoder)
        change(state)
        save_file(state, str(bad / "encoder.safetensors"))
        code = cli.main(["publish", str(bad), "--repo-id", REPO, "--tag", case, "--manifest", str(target), "--license", "mit"])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, err
        assert ("NaN or infinite" in err) == (case in ("nan", "inf")), err
        assert ("do not fit" in err or "differs from the model's" in err) == (case in ("missing", "extra")), err
    assert not target.exists() and env.requests == []


def test_an_unreachable_hub_fails_fast_and_leaves_the_manifest_alone(run_dir, hf_cache, monkeypatch, tmp_path, capsys,
                                                                   sleeps):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    monkeypatch.delenv("MED3D_HUB_MANIFEST", raising=False)
    data = medicalnet_bytes("resnet10")
    (tmp_path / "manifests").mkdir()
    target = write_manifest(tmp_path / "manifests" / "weights.json", medicalnet_entry("resnet10", "old", data))
    before = target.read_bytes()
    code = cli.main(["publish", str(run_dir), "--repo-id", REPO, "--tag", "new", "--manifest", str(target), "--license", "mit"])
    err = capsys.readouterr().err
    assert code == EXIT_UNREACHABLE and sleeps == []  # a refused connection is not retried with backoff
    assert "could not reach the Hub" in err and "nothing was uploaded" in err and len(err.strip().splitlines()) == 1
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["weights.json"]  # no temporary manifest left behind

    with HangingServer() as silent:  # accepts connections, never answers
        monkeypatch.setenv("HF_ENDPOINT", silent.endpoint)
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        code = cli.main(["publish", str(run_dir), "--repo-id", REPO, "--tag", "new", "--manifest", str(target), "--license", "mit"])
        assert code == EXIT_UNREACHABLE and silent.accepted == 1 and sleeps == []  # one request, ended by its timeout
    assert "timeout 1 s" in capsys.readouterr().err and target.read_bytes() == before


def test_a_failed_round_trip_is_reported_and_keeps_no_entry(run_dir, env, tmp_path, monkeypatch, capsys):
    target = tmp_path / "weights.json"
    check = publish_module._check_remote_sha

    def then_tamper(api, repo_id, commit, exported, *args):
        check(api, repo_id, commit, exported, *args)
        weights = (exported.folder / "model.safetensors").read_bytes()
        env.serve_corrupted(repo_id, "model.safetensors", weights[:-64] + bytes(64))  # a bad mirror from now on

    monkeypatch.setattr(publish_module, "_check_remote_sha", then_tamper)
    code = cli.main(["publish", str(run_dir), "--repo-id", REPO, "--tag", "broken", "--manifest", str(target), "--license", "mit"])
    err = capsys.readouterr().err
    assert code == EXIT_PUBLISH_FAILED, err
    assert "round trip" in err and "sha256 mismatch" in err and env.commits(REPO)[0] in err
    assert "the manifest was not changed" in err and not target.exists()


def test_the_token_is_never_printed_or_written(run_dir, hf_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MED3D_HUB_MANIFEST", raising=False)
    target = tmp_path / "weights.json"
    with HubServer(require_token=SECRET) as server:
        use_endpoint(monkeypatch, server.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_9f3a")
        args = ["publish", str(run_dir), "--repo-id", "me/private-r10", "--tag", "tok", "--manifest", str(target),
                "--license", "mit", "--private"]
        assert cli.main(args) == EXIT_USAGE  # refused access, before anything is sent
        first = capsys.readouterr()
        assert "HTTP 401" in first.err and "hf_wrong_token_9f3a" not in first.out + first.err

        monkeypatch.setenv("HF_TOKEN", SECRET)
        assert cli.main(args + ["--debug"]) == 0
        out = capsys.readouterr()
        assert server.repo_private("me/private-r10")
        uploaded = [server.file_bytes("me/private-r10", p) for p in
                    ("README.md", "config.json", "model.safetensors", "training_config.yaml", "metrics.jsonl")]
    assert SECRET not in out.out + out.err
    assert all(SECRET.encode() not in data for data in uploaded)
    assert all(SECRET.encode() not in p.read_bytes() for p in _files_under(tmp_path))
    assert manifest.read_manifest(target)[0].name == "resnet10.tok"


def test_a_fine_tuned_model_publishes_with_its_head_and_channels(env, tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = med3d_hub.create_model("resnet10", seg_classes=3, in_chans=2)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    model.eval()
    folder = tmp_path / "finetuned"
    model.save_pretrained(folder)
    target = tmp_path / "weights.json"
    lines: list[str] = []
    done = publish(folder, repo_id="med3d-test/r10-seg", tag="seg-ft", manifest=target, license="apache-2.0",
                   datasets=["LiTS (CT)"], echo=lines.append)
    assert done.round_trip["ok"] and done.round_trip["head"] == "pretrained" and done.round_trip["equal"]
    e = manifest.read_manifest(target)[0]
    assert e.in_chans == 2 and e.source["model_kwargs"] == {"in_chans": 2, "seg_classes": 3}
    assert e.source["datasets"] == ["LiTS (CT)"] and e.license == "apache-2.0"
    card = yaml.safe_load(env.file_bytes("med3d-test/r10-seg", "README.md").decode().split("---\n")[1])
    assert card["pipeline_tag"] == "image-segmentation" and "model-index" not in card

    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(target))
    loaded = med3d_hub.create_model("resnet10.seg-ft", pretrained=True).eval()  # its head and in_chans by name alone
    assert loaded.seg_classes == 3 and loaded.in_chans == 2
    x = fixed_input(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["head"] == "pretrained"
    encoder = med3d_hub.create_model("resnet10.seg-ft", pretrained=True, num_classes=0).eval()  # the caller's head wins
    assert encoder.seg_classes is None and encoder.num_classes == 0 and encoder.in_chans == 2
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), model.forward_features(x))


def test_an_upload_through_xet_to_a_server_without_it_is_explained(run_dir, tmp_path, hub_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MED3D_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT))
    target = tmp_path / "weights.json"
    done = subprocess.run(
        [sys.executable, "-m", "med3d_hub", "publish", str(run_dir), "--repo-id", REPO, "--tag", "xet",
         "--manifest", str(target), "--license", "mit"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == EXIT_PUBLISH_FAILED, done.stderr[-2000:]
    assert "HF_HUB_DISABLE_XET=1" in done.stderr and "Nothing was committed" in done.stderr
    assert not target.exists()


def test_a_model_object_is_checked_like_a_folder_before_the_hub_is_asked(hf_cache, monkeypatch, tmp_path):
    from med3d_hub.weights.hub import HubUnreachableError

    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    model = med3d_hub.create_model("resnet10", num_classes=4)
    target = tmp_path / "weights.json"
    with pytest.raises(HubUnreachableError, match="nothing was uploaded"):
        publish(model, repo_id=REPO, tag="obj", manifest=target, license="mit")
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"fc.weight \(1 of 2048\)"):
        publish(model, repo_id=REPO, tag="obj", manifest=target, license="mit")
    assert not target.exists()


def test_medicalnet_pth_of_a_strided_model_is_refused_and_its_card_says_stride_32(tmp_path):
    model = med3d_hub.create_model("resnet10", num_classes=0, dilated=False)
    model.save_pretrained(tmp_path / "strided")
    run = read_run(tmp_path / "strided", datasets=["Synth"])
    with pytest.raises(RunError, match="--medicalnet-pth needs a dilated model"):
        export(run, tmp_path / "with_pth", license="MIT", medicalnet_pth=True)
    assert not (tmp_path / "with_pth").exists()
    card = (export(run, tmp_path / "plain", license="MIT").folder / "README.md").read_text()
    assert "output stride 32" in card and "output stride 8" not in card
