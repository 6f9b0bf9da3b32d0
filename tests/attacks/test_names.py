"""Case 1: a repo id, revision or filename that would become a path outside the cache is refused first."""

from __future__ import annotations

import json
import os

import pytest
from medicalnet_files import entry, medicalnet_bytes, write_manifest
from scan_files import med3d_env, run_med3d

import med3d_hub
from med3d_hub.weights import hub

REPO = "med3d-test/MedicalNet-Resnet10"
TRAVERSALS = ["../../../outside/file", "..%2F..%2F..%2Foutside%2Ffile", "main/../../x", ".hidden", "a\\b", "x y", "@{-1}"]


def _files_under(root) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("revision", TRAVERSALS)
def test_hf_reference_with_a_traversing_revision_is_refused_before_any_request(env, tmp_path, revision):
    env.add_file(REPO, "resnet_10.pth", medicalnet_bytes("resnet10"))
    before = _files_under(tmp_path)
    with pytest.raises(ValueError, match="revision|filename"):
        med3d_hub.create_model("resnet10", pretrained=f"hf://{REPO}@{revision}/resnet_10.pth")
    assert env.requests == []
    assert _files_under(tmp_path) == before  # nothing written anywhere, in the cache or outside it


@pytest.mark.parametrize("repo_id, filename", [("org/..", "w.pth"), ("org--x/y", "w.pth"), ("org/repo", "../w.pth"),
                                               ("org/repo", "a/./w.pth"), ("org/repo", "a//w.pth")])
def test_bad_repo_ids_and_filenames_are_refused(repo_id, filename):
    with pytest.raises(ValueError, match="repo id|filename"):
        hub.HubFile(repo_id, filename, "main")


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "a" * 40, "release_2024-01"])
def test_the_hubs_own_revisions_still_pass(revision):
    assert hub.HubFile(REPO, "weights/resnet_10.pth", revision).revision == revision


def test_a_third_party_manifest_with_a_traversing_revision_exits_2_naming_the_file(tmp_path):
    data = medicalnet_bytes("resnet10")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    bad = write_manifest(tmp_path / "third-party.json", entry("resnet10", "evil", data, revision="../../../../victim.txt"))
    env = med3d_env(tmp_path, MED3D_HUB_MANIFEST=str(bad))
    done = run_med3d("download", "resnet10.evil", env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert str(bad) in done.stderr and "revision" in done.stderr
    assert victim.read_text() == "keep me"
    assert json.loads(bad.read_text())["weights"][0]["revision"].startswith("..")  # the manifest itself untouched
