"""Pretrained weights end to end, against a Hub-protocol server on 127.0.0.1 (tests/hub_server.py).

The server holds MedicalNet-format files with random weights (tests/medicalnet_files.py); a private
manifest points at them. Every test gets a fresh Hugging Face cache and a fresh med3d_hub cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HangingServer, closed_port_endpoint
from medicalnet_files import (
    entry,
    files_with_content,
    medicalnet_bytes,
    sha256,
    state_dict_of,
    tampered,
    write_manifest,
)

import med3d_hub
from med3d_hub.weights import hub, manifest
from med3d_hub.weights.checkpoints import CheckpointMismatchError

pytestmark = pytest.mark.hub  # runs once per huggingface_hub generation (.ci/compat.sh)

REPO = "med3d-test/MedicalNet-Resnet10"
FILE = "resnet_10.pth"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data() -> bytes:
    return medicalnet_bytes("resnet10")


@pytest.fixture
def env(hf_cache, hub_server, monkeypatch, tmp_path):
    """The Hub server as HF_ENDPOINT, no manifests beyond the shipped one, fresh caches."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    for name in ("MED3D_HUB_MANIFEST", "MED3D_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(manifest, "_added", [])
    return hub_server


@pytest.fixture
def hosted(env, data, tmp_path, monkeypatch):
    """resnet_10.pth on the server and a private manifest naming it resnet10.test, the resnet10 default."""
    env.add_file(REPO, FILE, data)
    path = write_manifest(tmp_path / "private.json", entry("resnet10", "test", data, default=True))
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(path))
    return env


def our_cache(hf_cache: Path) -> Path:
    return hf_cache.parent / "med3d_hub"


def gets(server, path_end: str = FILE) -> int:
    return sum(1 for method, path in server.requests if method == "GET" and path.endswith(path_end))


def assert_backbone_equal(model, data: bytes) -> None:
    expected = state_dict_of(data)
    got = {k: v for k, v in model.state_dict().items() if not k.startswith(("fc.", "conv_seg."))}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# -- requirement 3/5: download through huggingface_hub, strict load, pretrained_cfg, safetensors cache


def test_default_weights_download_verify_and_load(hosted, data, hf_cache, caplog):
    with caplog.at_level(logging.INFO, logger="med3d_hub"):
        model = med3d_hub.create_model("resnet10", pretrained=True, num_classes=3)
    assert_backbone_equal(model, data)
    assert gets(hosted) == 1
    cfg = model.pretrained_cfg
    assert cfg["name"] == "resnet10.test" and cfg["tag"] == "test" and cfg["architecture"] == "resnet10"
    assert (cfg["hf_hub_id"], cfg["revision"], cfg["filename"]) == (REPO, "main", FILE)
    assert cfg["sha256"] == sha256(data) and cfg["size"] == len(data) and cfg["license"] == "MIT"
    assert cfg["format"] == "medicalnet-pth" and cfg["shortcut"] == "B" and cfg["head"] == "new"
    assert cfg["preprocess"]["intensity"]["method"] == "percentile_zscore"
    assert cfg["in_chans"] == cfg["weights_in_chans"] == 1 and cfg["file"] is None
    assert json.loads(json.dumps(cfg)) == cfg  # a plain, JSON-ready dict
    assert "freshly initialised" in caplog.text and "fc, 3 classes" in caplog.text
    # the new head is really initialised, like a random model's (normal std 0.01, zero bias)
    assert model.fc.bias.abs().sum() == 0 and 0.005 < model.fc.weight.std() < 0.02
    assert all(not t.is_meta for t in model.state_dict().values())
    # the HF cache has the file; ours has the converted copy, named by the sha256
    assert (our_cache(hf_cache) / "weights" / f"{sha256(data)}.safetensors").is_file()
    assert files_with_content(hf_cache, data)


def test_second_load_reads_the_safetensors_cache_without_network_or_unpickling(hosted, data, monkeypatch):
    first = med3d_hub.create_model("resnet10.test", pretrained=True, num_classes=0)
    assert_backbone_equal(first, data)
    requests_after_first = len(hosted.requests)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not run once the weights are cached")

    monkeypatch.setattr(torch, "load", no_unpickling)
    second = med3d_hub.create_model("resnet10.test", pretrained=True, num_classes=0)
    assert len(hosted.requests) == requests_after_first  # the sha256 pins the content: no request at all
    assert_backbone_equal(second, data)
    assert second.pretrained_cfg == first.pretrained_cfg
    # memory-mapped tensors still train: an in-place update works and leaves the cache file intact
    second.conv1.weight.data.add_(1.0)
    third = med3d_hub.create_model("resnet10.test", pretrained=True, num_classes=0)
    assert_backbone_equal(third, data)


def test_tag_in_name_and_features_only(hosted, data):
    model = med3d_hub.create_model("resnet10.test", pretrained=True, features_only=True, out_indices=(2, 4))
    assert model.pretrained_cfg["head"] is None
    assert_backbone_equal(model, data)
    outs = model(torch.randn(1, 1, 16, 32, 32))
    assert [o.shape[1] for o in outs] == [128, 512]


# -- requirement 6: heads and input channels


def test_segmentation_head_is_fresh_and_initialised(hosted, data, caplog):
    with caplog.at_level(logging.INFO, logger="med3d_hub"):
        model = med3d_hub.create_model("resnet10.test", pretrained=True, seg_classes=4)
    assert_backbone_equal(model, data)
    assert model.pretrained_cfg["head"] == "new" and "conv_seg, 4 classes" in caplog.text
    bn = model.conv_seg[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert model.conv_seg[6].weight.std() > 0
    assert model(torch.randn(1, 1, 16, 32, 32)).shape == (1, 4, 4, 8, 8)


def test_in_chans_adaptation_gives_single_channel_features_for_a_repeated_volume(hosted):
    one = med3d_hub.create_model("resnet10.test", pretrained=True, num_classes=0).eval()
    volume = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        reference = one.forward_features(volume)
        for in_chans in (2, 4):
            many = med3d_hub.create_model("resnet10.test", pretrained=True, num_classes=0, in_chans=in_chans).eval()
            assert many.conv1.weight.shape[1] == in_chans
            assert torch.allclose(many.conv1.weight.sum(1), one.conv1.weight.sum(1), atol=1e-6)
            assert many.pretrained_cfg["in_chans"] == in_chans and many.pretrained_cfg["weights_in_chans"] == 1
            repeated = volume.repeat(1, in_chans, 1, 1, 1)
            # equal up to float32 summation order, relative to the activations' scale
            first_conv = one.conv1(volume)
            assert (many.conv1(repeated) - first_conv).abs().max() <= 1e-5 * first_conv.abs().max()
            features = many.forward_features(repeated)
            assert (features - reference).abs().max() <= 1e-5 * reference.abs().max()


# -- requirement 4: verification and removal of bad bytes


def test_tampered_download_is_rejected_and_removed_from_every_cache(hosted, data, hf_cache):
    bad = tampered(data)
    hosted.serve_corrupted(REPO, FILE, bad)
    with pytest.raises(hub.ChecksumError) as info:
        med3d_hub.create_model("resnet10.test", pretrained=True)
    message = str(info.value)
    assert FILE in message and sha256(data) in message and sha256(bad) in message
    assert gets(hosted) == 1
    for root in (hf_cache, our_cache(hf_cache)):
        if root.exists():
            assert files_with_content(root, bad) == [], f"bad bytes left under {root}"
            assert not [p for p in root.rglob("*") if p.is_symlink() and not p.exists()], "dangling links left"
            assert not list(root.rglob("*.incomplete"))


def test_tampered_cache_offline_is_rejected_and_removed(hosted, data, hf_cache, monkeypatch):
    med3d_hub.create_model("resnet10.test", pretrained=True)
    [blob] = files_with_content(hf_cache, data)
    bad = tampered(data)
    blob.write_bytes(bad)  # bit rot, or someone writing into the cache
    for cached in (our_cache(hf_cache) / "weights").iterdir():
        cached.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.ChecksumError) as info:
        med3d_hub.create_model("resnet10.test", pretrained=True)
    assert sha256(bad) in str(info.value) and sha256(data) in str(info.value)
    assert files_with_content(hf_cache, bad) == [] and not blob.exists()


def test_server_reporting_other_content_than_the_manifest_fails_before_downloading(env, data, monkeypatch):
    # The shipped manifest pins the real resnet_10.pth; a mirror serving other bytes under that name is refused.
    env.add_file("TencentMedicalNet/MedicalNet-Resnet10", "resnet_10.pth", data)
    with pytest.raises(hub.ChecksumError) as info:
        med3d_hub.create_model("resnet10.3dseg8", pretrained=True)
    shipped = manifest.find_entry("resnet10", "3dseg8").sha256
    assert shipped in str(info.value) and sha256(data) in str(info.value)
    assert gets(env, "resnet_10.pth") == 0


def test_local_file_with_a_tag_must_match_the_manifest(data, tmp_path, hf_cache):
    path = tmp_path / "resnet_10.pth"
    path.write_bytes(data)
    with pytest.raises(hub.ChecksumError, match="resnet10.3dseg8"):
        med3d_hub.create_model("resnet10.3dseg8", pretrained=str(path))
    assert path.read_bytes() == data  # a user's own file is never deleted


# -- requirement 7: unreachable Hubs fail fast and say what to do


def test_closed_port_fails_fast_with_the_ways_out(hosted, monkeypatch, sleeps):
    endpoint = closed_port_endpoint()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(hub.HubUnreachableError) as info:
        med3d_hub.create_model("resnet10", pretrained=True)
    assert sleeps == []  # a refused connection is not retried with backoff
    message = str(info.value)
    for needed in (endpoint, REPO, FILE, "HF_ENDPOINT", "HF_HUB_OFFLINE", "pretrained='/path/to/"):
        assert needed in message, needed


def test_silent_server_fails_within_the_metadata_timeout(hosted, monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with HangingServer() as silent:
        monkeypatch.setenv("HF_ENDPOINT", silent.endpoint)
        with pytest.raises(hub.HubUnreachableError, match="timeout 1 s"):
            med3d_hub.create_model("resnet10", pretrained=True)
        assert silent.accepted == 1  # one metadata request, ended by its timeout, not retried


@pytest.mark.slow
def test_silent_server_with_default_settings_fails_on_the_default_timeout(hosted, monkeypatch):
    with HangingServer() as silent:
        monkeypatch.setenv("HF_ENDPOINT", silent.endpoint)
        with pytest.raises(hub.HubUnreachableError) as info:
            med3d_hub.create_model("resnet10", pretrained=True)
        assert silent.accepted == 1  # one metadata request, ended by the default timeout, not retried
    assert "timeout 10 s" in str(info.value)
    assert silent.endpoint in str(info.value) and "HF_ENDPOINT" in str(info.value)


def test_unreachable_hub_falls_back_to_the_verified_hf_cache(hosted, data, hf_cache, monkeypatch, caplog):
    med3d_hub.create_model("resnet10.test", pretrained=True)
    for cached in (our_cache(hf_cache) / "weights").iterdir():
        cached.unlink()
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    with caplog.at_level(logging.WARNING, logger="med3d_hub"):
        model = med3d_hub.create_model("resnet10.test", pretrained=True)
    assert_backbone_equal(model, data)
    assert "using the cached copy" in caplog.text


# -- offline use


def test_offline_after_caching(hosted, data, hf_cache, monkeypatch):
    med3d_hub.create_model("resnet10.test", pretrained=True)
    hosted.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_backbone_equal(med3d_hub.create_model("resnet10.test", pretrained=True), data)
    # also from huggingface_hub's cache alone, converting again (and verifying) without the network
    for cached in (our_cache(hf_cache) / "weights").iterdir():
        cached.unlink()
    assert_backbone_equal(med3d_hub.create_model("resnet10", pretrained=True, local_files_only=True), data)


def test_hf_reference_converted_from_a_local_copy_loads_offline(env, data, tmp_path, monkeypatch):
    """The same bytes loaded first from a path: the hf:// load is then satisfied from the converted
    cache without a download, and must still work offline afterwards."""
    env.add_file("someone/else", "r10.pth", data)
    local = tmp_path / "r10.pth"
    local.write_bytes(data)
    med3d_hub.create_model("resnet10", pretrained=str(local), num_classes=0)
    med3d_hub.create_model("resnet10", pretrained="hf://someone/else/r10.pth", num_classes=0)
    assert gets(env, "r10.pth") == 0
    env.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_backbone_equal(med3d_hub.create_model("resnet10", pretrained="hf://someone/else/r10.pth", num_classes=0), data)


def test_offline_without_a_cached_copy_says_so(hosted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnreachableError, match="offline mode is on"):
        med3d_hub.create_model("resnet10.test", pretrained=True)
    assert hosted.requests == []


# -- hf:// references and other sources


def test_hf_reference_is_checked_against_the_hubs_lfs_sha256(env, data, monkeypatch):
    commit = env.add_file("someone/else", "weights/r10.pth", data)
    model = med3d_hub.create_model("resnet10", pretrained=f"hf://someone/else@{commit}/weights/r10.pth", num_classes=0)
    assert_backbone_equal(model, data)
    cfg = model.pretrained_cfg
    assert (cfg["hf_hub_id"], cfg["revision"], cfg["filename"]) == ("someone/else", commit, "weights/r10.pth")
    assert cfg["sha256"] == sha256(data) and cfg["tag"] is None and cfg["license"] is None
    assert cfg["preprocess"]["intensity"]["method"] == "percentile_zscore"


def test_tampered_hf_reference_is_rejected(env, data, hf_cache):
    env.add_file("someone/tampered", "r10.pth", data)
    bad = tampered(data)
    env.serve_corrupted("someone/tampered", "r10.pth", bad)
    with pytest.raises(hub.ChecksumError) as info:
        med3d_hub.create_model("resnet10", pretrained="hf://someone/tampered/r10.pth")
    assert "r10.pth" in str(info.value) and sha256(data) in str(info.value) and sha256(bad) in str(info.value)
    assert files_with_content(hf_cache.parent, bad) == []


def test_hf_reference_errors_name_what_is_missing(env, data):
    env.add_file("someone/else", "r10.pth", data)
    with pytest.raises(hub.WeightsDownloadError, match="repo nobody/nothing was not found"):
        med3d_hub.create_model("resnet10", pretrained="hf://nobody/nothing/r10.pth")
    with pytest.raises(hub.WeightsDownloadError, match="missing.pth does not exist"):
        med3d_hub.create_model("resnet10", pretrained="hf://someone/else/missing.pth")
    with pytest.raises(hub.WeightsDownloadError, match="revision 'v9' does not exist"):
        med3d_hub.create_model("resnet10", pretrained="hf://someone/else@v9/r10.pth")
    with pytest.raises(ValueError, match="hf://org/repo@revision/path"):
        med3d_hub.create_model("resnet10", pretrained="hf://just-a-name")


def test_url_mirror_is_used_when_the_hub_does_not_have_the_file(env, data, hf_cache, tmp_path, monkeypatch):
    env.add_file("elsewhere/files", "resnet_10.pth", data)
    url = f"{env.endpoint}/elsewhere/files/resolve/main/resnet_10.pth"
    mirrored = entry("resnet10", "mirrored", data, hf_hub_id="med3d-test/not-there", urls=[url])
    url_only = entry("resnet10", "urlonly", data, hf_hub_id=None, urls=[url])
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", mirrored, url_only)))

    model = med3d_hub.create_model("resnet10.mirrored", pretrained=True)
    assert_backbone_equal(model, data)
    kept = our_cache(hf_cache) / "downloads" / sha256(data) / "resnet_10.pth"
    assert kept.read_bytes() == data
    assert not list(our_cache(hf_cache).rglob("*.incomplete"))
    assert model.pretrained_cfg["urls"] == [url]


def test_tampered_url_mirror_keeps_nothing(env, data, hf_cache, tmp_path, monkeypatch):
    env.add_file("elsewhere/files", "resnet_10.pth", data)
    bad = tampered(data)
    env.serve_corrupted("elsewhere/files", "resnet_10.pth", bad)
    url = f"{env.endpoint}/elsewhere/files/resolve/main/resnet_10.pth"
    monkeypatch.setenv(
        "MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet10", "u", data, hf_hub_id=None, urls=[url])))
    )
    with pytest.raises(hub.ChecksumError) as info:
        med3d_hub.create_model("resnet10.u", pretrained=True)
    assert sha256(bad) in str(info.value) and url in str(info.value)
    assert files_with_content(hf_cache.parent, bad) == []


def test_url_mirror_on_a_closed_port_is_reported(env, data, tmp_path, monkeypatch, sleeps):
    url = f"{closed_port_endpoint()}/resnet_10.pth"
    monkeypatch.setenv(
        "MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet10", "u", data, hf_hub_id=None, urls=[url])))
    )
    with pytest.raises(hub.HubUnreachableError) as info:
        med3d_hub.create_model("resnet10.u", pretrained=True)
    assert sleeps == []  # a refused connection is not retried with backoff
    assert url in str(info.value) and "HF_ENDPOINT" in str(info.value)


def test_every_failed_source_is_reported(env, data, tmp_path, monkeypatch):
    url = f"{closed_port_endpoint()}/resnet_10.pth"
    monkeypatch.setenv(
        "MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet10", "u", data, urls=[url])))
    )
    with pytest.raises(hub.WeightsDownloadError) as info:
        med3d_hub.create_model("resnet10.u", pretrained=True)
    message = str(info.value)
    assert "any of its 2 sources" in message and f"repo {REPO} was not found" in message and url in message


def test_token_is_read_at_call_time(hf_cache, data, tmp_path, monkeypatch):
    from hub_server import HubServer

    with HubServer(require_token="hf_secret") as private:
        private.add_file(REPO, FILE, data)
        monkeypatch.setenv("HF_ENDPOINT", private.endpoint)
        monkeypatch.setattr(manifest, "_added", [])
        monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet10", "p", data))))
        with pytest.raises(hub.WeightsDownloadError, match="HF_TOKEN"):
            med3d_hub.create_model("resnet10.p", pretrained=True)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        assert_backbone_equal(med3d_hub.create_model("resnet10.p", pretrained=True), data)


def test_organisation_manifest_overrides_a_shipped_entry(env, data, tmp_path, monkeypatch):
    env.add_file("my-org/medicalnet-copy", "resnet_10.pth", data)
    override = entry("resnet10", "3dseg8", data, hf_hub_id="my-org/medicalnet-copy", default=True, license="internal")
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "org.json", override)))
    model = med3d_hub.create_model("resnet10", pretrained=True)
    assert model.pretrained_cfg["hf_hub_id"] == "my-org/medicalnet-copy" and model.pretrained_cfg["license"] == "internal"
    assert_backbone_equal(model, data)


# -- local files


def test_local_files_shortcut_and_provenance(data, tmp_path, hf_cache, monkeypatch):
    monkeypatch.delenv("MED3D_HUB_MANIFEST", raising=False)
    monkeypatch.setattr(manifest, "_added", [])
    path = tmp_path / "mine.pth"
    path.write_bytes(data)
    model = med3d_hub.create_model("resnet10", pretrained=path)
    assert_backbone_equal(model, data)
    cfg = model.pretrained_cfg
    assert cfg["file"] == str(path) and cfg["tag"] is None and cfg["sha256"] == sha256(data) and cfg["size"] == len(data)

    # the same bytes named in a manifest: the local copy keeps the entry's provenance
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet10", "test", data))))
    assert med3d_hub.create_model("resnet10", pretrained=path).pretrained_cfg["name"] == "resnet10.test"

    with pytest.raises(CheckpointMismatchError, match="missing keys: layer1.1"):
        med3d_hub.create_model("resnet18", pretrained=path)
    with pytest.raises(ValueError, match="trained with shortcut 'B'"):
        med3d_hub.create_model("resnet10", pretrained=path, shortcut="A")
    with pytest.raises(FileNotFoundError, match="neither an existing file nor an hf:// reference"):
        med3d_hub.create_model("resnet10", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(TypeError, match="pretrained must be"):
        med3d_hub.create_model("resnet10", pretrained=3)


def test_shortcut_a_weights_load_strictly_and_conflicts_are_named(tmp_path, hf_cache, monkeypatch):
    monkeypatch.setattr(manifest, "_added", [])
    data18 = medicalnet_bytes("resnet18")
    path = tmp_path / "resnet_18.pth"
    path.write_bytes(data18)
    model = med3d_hub.create_model("resnet18", pretrained=path, num_classes=0)
    assert model.shortcut == "A" and model.pretrained_cfg["shortcut"] == "A"
    assert_backbone_equal(model, data18)
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(write_manifest(tmp_path / "m.json", entry("resnet18", "t", data18))))
    with pytest.raises(ValueError, match="trained with shortcut 'A', but shortcut='B'"):
        med3d_hub.create_model("resnet18.t", pretrained=path, shortcut="B")


def test_unknown_tag_lists_the_known_ones(hf_cache):
    with pytest.raises(ValueError, match="resnet50.3dseg8, resnet50.23datasets"):
        med3d_hub.create_model("resnet50.imagenet", pretrained=True)


# -- requirement 8: concurrent loaders


_LOADER = """
import hashlib, sys, med3d_hub
model = med3d_hub.create_model("resnet10.test", pretrained=True, num_classes=0)
digest = hashlib.sha256()
for key, value in sorted(model.state_dict().items()):
    digest.update(key.encode()); digest.update(value.contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


def test_four_concurrent_loaders_download_once_and_agree(hosted, data, hf_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOADER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    digests = {out.strip() for out, _ in results}
    assert len(digests) == 1

    expected = hashlib.sha256()
    for key, value in sorted(state_dict_of(data).items()):
        expected.update(key.encode())
        expected.update(value.contiguous().numpy().tobytes())
    assert digests == {expected.hexdigest()}
    # One process fetched and converted under the lock; the others found the converted copy.
    assert gets(hosted) == 1


# -- requirement 9: torch.hub


def test_torch_hub_local_source(hosted, data):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # torch.hub.list's rule: every public callable of hubconf is an entrypoint
    names = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    assert sorted(names) == sorted(["create_model", *med3d_hub.list_models()])
    assert hubconf.dependencies and all(getattr(hubconf, n).__doc__ for n in names)
    assert "ResNet-50" in hubconf.resnet50.__doc__
    model = torch.hub.load(str(REPO_ROOT), "resnet10", source="local", pretrained=True, num_classes=2)
    assert_backbone_equal(model, data)
    assert model.pretrained_cfg["name"] == "resnet10.test"
    tagged = torch.hub.load(str(REPO_ROOT), "create_model", "resnet10.test", source="local", pretrained=True)
    assert tagged.pretrained_cfg["name"] == "resnet10.test"


def test_hubconf_imports_stay_light():
    code = "import sys, runpy; runpy.run_path('hubconf.py'); print(any(m.startswith('med3d_hub') for m in sys.modules), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- requirement 10: timm


def test_timm_registry_builds_through_our_loader(hosted, data):
    import timm

    import med3d_hub.timm_models  # noqa: F401  (registers med3d_resnet*)

    assert "med3d_resnet50.3dseg8" in timm.list_pretrained("med3d_*")
    assert set(timm.list_models("med3d_*")) == {f"med3d_{n}" for n in med3d_hub.list_models()}
    model = timm.create_model("med3d_resnet10.test", pretrained=True, num_classes=3, in_chans=2)
    assert isinstance(model, med3d_hub.models.Med3DResNet)
    assert model.pretrained_cfg["name"] == "resnet10.test" and model.conv1.weight.shape[1] == 2
    backbone = state_dict_of(data)
    assert torch.equal(model.layer4[0].conv2.weight, backbone["layer4.0.conv2.weight"])
    assert timm.create_model("med3d_resnet10", pretrained=True).pretrained_cfg["name"] == "resnet10.test"
    random = timm.create_model("med3d_resnet18", num_classes=0)
    assert "sha256" not in random.pretrained_cfg and random.pretrained_cfg["input_size"] == [1, 56, 448, 448]
    assert model.pretrained_cfg["input_size"][0] == 2 and model.pretrained_cfg["num_classes"] == 3
