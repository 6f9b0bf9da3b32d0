"""Case 3 and the cache root: converted weights identify themselves, `med3d cache` lists, clears, verifies."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch
from medicalnet_files import entry, medicalnet_bytes, state_dict_of, write_manifest

import med3d_hub
from med3d_hub.cli import app as cli
from med3d_hub.weights import hub

REPO = "med3d-test/MedicalNet-Resnet10"
FILE = "resnet_10.pth"


def backbone(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def assert_weights(model, data: bytes) -> None:
    expected = state_dict_of(data)
    got = backbone(model)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.fixture
def two_sets(env, tmp_path, monkeypatch):
    """Two resnet10 weights on the server, resnet10.one (the default) and resnet10.two."""
    one, two = medicalnet_bytes("resnet10", seed=0), medicalnet_bytes("resnet10", seed=1)
    env.add_file(REPO, FILE, one)
    env.add_file(REPO, "two.pth", two)
    path = write_manifest(tmp_path / "m.json", entry("resnet10", "one", one, default=True),
                          entry("resnet10", "two", two, filename="two.pth"))
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(path))
    return one, two


@pytest.mark.parametrize("offline", [False, True])
def test_a_swapped_cache_file_is_not_loaded_as_the_pinned_weights(two_sets, our_cache, monkeypatch, caplog, offline):
    one, two = two_sets
    med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    med3d_hub.create_model("resnet10.two", pretrained=True, num_classes=0)
    cached_one = our_cache / "weights" / f"{hashlib.sha256(one).hexdigest()}.safetensors"
    cached_two = our_cache / "weights" / f"{hashlib.sha256(two).hexdigest()}.safetensors"
    shutil.copyfile(cached_two, cached_one)  # another model's converted weights under resnet10.one's name
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="med3d_hub"):
        model = med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    assert_weights(model, one)  # rebuilt from the verified download, not the swapped file
    assert "swapped" in caplog.text


def test_a_truncated_cache_file_is_rebuilt(two_sets, our_cache, caplog):
    one, _ = two_sets
    med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    cached = our_cache / "weights" / f"{hashlib.sha256(one).hexdigest()}.safetensors"
    cached.write_bytes(cached.read_bytes()[:-4096])
    with caplog.at_level(logging.WARNING, logger="med3d_hub"):
        assert_weights(med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0), one)
    assert "removing cached weights" in caplog.text


def test_a_false_hash_memo_entry_does_not_make_a_local_file_pass_as_the_pinned_weights(two_sets, our_cache, tmp_path):
    """The memo an earlier version kept (path, size, inode, times -> sha256) is not trusted: a local file is hashed."""
    one, two = two_sets
    med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    other = tmp_path / "other.pth"
    other.write_bytes(two)
    st = other.stat()
    key = hashlib.sha256(f"{other.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode()).hexdigest()
    (our_cache / "hashes").mkdir(parents=True, exist_ok=True)
    (our_cache / "hashes" / key).write_text(hashlib.sha256(one).hexdigest())  # the lie: "this file is resnet10.one"
    with pytest.raises(hub.ChecksumError, match="sha256 mismatch"):
        med3d_hub.create_model("resnet10.one", pretrained=str(other), num_classes=0)


def test_cache_files_carry_their_identity(two_sets, our_cache):
    one, _ = two_sets
    med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    from safetensors import safe_open

    with safe_open(str(our_cache / "weights" / f"{hashlib.sha256(one).hexdigest()}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["source_sha256"] == hashlib.sha256(one).hexdigest()
    assert meta["architecture"] == "resnet10" and meta["source_bytes"] == str(len(one))
    assert int(meta["tensors"]) == len(state_dict_of(one)) and len(meta["keys_sha256"]) == 64


def test_cache_verify_finds_bit_rot_the_cheap_check_cannot_see(two_sets, our_cache, capsys):
    one, _ = two_sets
    med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    cached = our_cache / "weights" / f"{hashlib.sha256(one).hexdigest()}.safetensors"
    raw = bytearray(cached.read_bytes())
    raw[-100] ^= 0x40  # one flipped bit in the tensor data: same size, same header
    cached.write_bytes(bytes(raw))
    assert cli.main(["cache", "verify"]) == 1
    err = capsys.readouterr().err
    assert str(cached) in err and "tensor data differ" in err
    assert not cached.exists()
    assert cli.main(["cache", "verify"]) == 0  # what is left is good (the Hub blob too)


def test_cache_verify_removes_a_bad_hub_blob_and_its_links(two_sets, hf_cache, capsys):
    one, _ = two_sets
    med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    blob = next((hf_cache / f"models--{REPO.replace('/', '--')}" / "blobs").glob(hashlib.sha256(one).hexdigest()))
    blob.write_bytes(b"x" * blob.stat().st_size)
    assert cli.main(["cache", "verify"]) == 1
    assert not blob.exists()
    assert not any(p.is_symlink() for p in (hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots").rglob("*"))


def test_cache_lists_and_clears_by_kind(two_sets, our_cache, capsys):
    med3d_hub.create_model("resnet10.one", pretrained=True, num_classes=0)
    (our_cache / "train" / "Task01").mkdir(parents=True)
    (our_cache / "train" / "Task01" / "img.npy").write_bytes(b"0" * 1000)
    assert cli.main(["cache", "--json"]) == 0
    listing = {k["kind"]: k for k in json.loads(capsys.readouterr().out)["kinds"]}
    assert listing["weights"]["files"] == 1 and listing["train"]["bytes"] == 1000 and listing["hub"]["files"] >= 1
    assert cli.main(["cache", "clear", "train"]) == 0
    assert not (our_cache / "train").exists() and any((our_cache / "weights").iterdir())
    assert cli.main(["cache", "clear", "nonsense"]) == 2
    assert cli.main(["cache", "clear"]) == 0
    assert not (our_cache / "weights").exists()


def test_one_cache_root_for_weights_and_training(monkeypatch, tmp_path):
    from med3d_hub.training.cache import default_cache_dir

    monkeypatch.delenv("MED3D_CACHE", raising=False)
    monkeypatch.setenv("MED3D_HUB_CACHE", str(tmp_path / "root"))
    assert hub.settings().cache == tmp_path / "root"
    assert default_cache_dir() == tmp_path / "root" / "train"
    monkeypatch.delenv("MED3D_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_cache_dir() == tmp_path / "hf" / "med3d_hub" / "train"
    assert hub.settings().cache == tmp_path / "hf" / "med3d_hub"


def test_the_old_variable_still_works_with_a_warning(monkeypatch, tmp_path, caplog):
    from med3d_hub.training.cache import default_cache_dir

    monkeypatch.delenv("MED3D_HUB_CACHE", raising=False)
    monkeypatch.setenv("MED3D_CACHE", str(tmp_path / "old"))
    monkeypatch.setattr(hub.environment, "_warned_old_env", [])
    with caplog.at_level(logging.WARNING, logger="med3d_hub"):
        assert default_cache_dir() == tmp_path / "old" / "train"
        assert hub.settings().cache == tmp_path / "old"
    assert caplog.text.count("MED3D_HUB_CACHE") == 1


def test_a_false_memo_in_the_current_format_cannot_swap_an_untagged_local_file(env, our_cache, tmp_path, caplog):
    """The memo names another file's sha256 (with this file's own sampled digest): the converted copy it would
    pick recorded another source, so the file is hashed again and its own weights load. Neither file is in a
    manifest, so nothing but the cache lookup depends on the memo."""
    one, two = medicalnet_bytes("resnet10", seed=2), medicalnet_bytes("resnet10", seed=3)
    first, other = tmp_path / "one.pth", tmp_path / "other.pth"
    first.write_bytes(one)
    other.write_bytes(two)
    med3d_hub.create_model("resnet10", pretrained=str(first), num_classes=0)  # converts one into the cache
    st = other.stat()
    key = hashlib.sha256(f"{other.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode()).hexdigest()
    (our_cache / "hashes").mkdir(parents=True, exist_ok=True)
    (our_cache / "hashes" / key).write_text(f"{hashlib.sha256(one).hexdigest()} {hub.sample_digest(other)}")
    with caplog.at_level(logging.WARNING, logger="med3d_hub"):
        model = med3d_hub.create_model("resnet10", pretrained=str(other), num_classes=0)
    assert_weights(model, two)
    assert model.pretrained_cfg["sha256"] == hashlib.sha256(two).hexdigest()
