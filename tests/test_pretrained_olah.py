"""The loader against olah, a self-hosted Hub mirror written by someone else (offline mode, git repos).

tests/test_pretrained.py proves the behaviour against our own Hub-protocol server; these tests show
that nothing depends on that server's reading of the protocol.
"""

from __future__ import annotations

import logging

import pytest
import torch
from medicalnet_files import entry, files_with_content, medicalnet_bytes, sha256, state_dict_of, write_manifest

import med3d_hub
from med3d_hub.weights import hub, manifest

pytestmark = pytest.mark.hub  # runs once per huggingface_hub generation (.ci/compat.sh)

REPO = "med3d-olah/MedicalNet-Resnet10"


@pytest.fixture
def mirrored(olah_mirror, hf_cache, tmp_path, monkeypatch):
    """resnet_10.pth in a git repo served by olah (added once per session), olah as HF_ENDPOINT."""
    data = medicalnet_bytes("resnet10")
    if not getattr(olah_mirror, "_med3d_commit", None):
        olah_mirror._med3d_commit = olah_mirror.add_repo(REPO, {"resnet_10.pth": data, "README.md": b"# test\n"})
    monkeypatch.setenv("HF_ENDPOINT", olah_mirror.endpoint)
    for name in ("HF_HUB_OFFLINE", "MED3D_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(manifest, "_added", [])
    path = write_manifest(tmp_path / "m.json", entry("resnet10", "olah", data, hf_hub_id=REPO))
    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(path))
    return olah_mirror, olah_mirror._med3d_commit, data


def _assert_weights(model, data):
    expected = state_dict_of(data)
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_manifest_weights_through_olah_then_offline(mirrored, hf_cache, monkeypatch):
    _, _, data = mirrored
    model = med3d_hub.create_model("resnet10.olah", pretrained=True, num_classes=2)
    _assert_weights(model, data)
    assert model.pretrained_cfg["hf_hub_id"] == REPO and model.pretrained_cfg["sha256"] == sha256(data)
    assert files_with_content(hf_cache, data)  # huggingface_hub's cache holds the verified file

    for cached in (hf_cache.parent / "med3d_hub" / "weights").iterdir():
        cached.unlink()  # force a read of the HF cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_weights(med3d_hub.create_model("resnet10.olah", pretrained=True), data)


def test_pinned_hf_reference_through_olah_uses_the_lfs_sha256(mirrored, caplog):
    _, commit, data = mirrored
    with caplog.at_level(logging.WARNING, logger="med3d_hub"):
        model = med3d_hub.create_model("resnet10", pretrained=f"hf://{REPO}@{commit}/resnet_10.pth", num_classes=0)
    assert "without a content check" not in caplog.text  # olah reported the LFS sha256, and it was checked
    _assert_weights(model, data)
    assert model.pretrained_cfg["revision"] == commit and model.pretrained_cfg["sha256"] == sha256(data)


def test_missing_file_on_olah_is_a_clear_error(mirrored):
    # olah answers a missing file, revision or repo alike (a 401 that the client reads as "repo not found")
    with pytest.raises(hub.WeightsDownloadError, match="cannot download"):
        med3d_hub.create_model("resnet10", pretrained=f"hf://{REPO}/not_there.pth")
