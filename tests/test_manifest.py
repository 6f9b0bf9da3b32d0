"""The weights manifest: the shipped entries, validation errors, merging of private manifests, docs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from medicalnet_files import MANIFEST_PREPROCESS, write_manifest

import med3d_hub
from med3d_hub.weights import manifest
from med3d_hub.weights.manifest import ManifestError

REPO_ROOT = Path(__file__).resolve().parents[1]

# REFERENCE: the released MedicalNet files (file, bytes, sha256 = Git LFS oid).
UPSTREAM = {
    "resnet_10.pth": (57456599, "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0"),
    "resnet_10_23dataset.pth": (57456599, "afa8055f3e47f4a18239495d92a7abc587902c69c31c743de2b2784653b72605"),
    "resnet_18.pth": (131992196, "38b3a17444c5c18a795355a868e6a2d9ce9318054067f5373d337f55c0f61da3"),
    "resnet_18_23dataset.pth": (131992196, "61224f9317fcce873366deb3703183e92cc47325b726b69691b33536244e10f4"),
    "resnet_34.pth": (253276232, "977a1be79298602fa35980de9c03789229ad36087fb1f4d9bde468aec653c658"),
    "resnet_34_23dataset.pth": (253276232, "3ea7188e396774e4ef95b66e5e90a78273bb33f6e58d3d717bf24f5f1aaeaa28"),
    "resnet_50.pth": (184885051, "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84"),
    "resnet_50_23dataset.pth": (184885051, "ff48a62219073fb977fd3f4ddfb8dc1367f0ec156c8d6f6c37e205bd683a246e"),
    "resnet_101.pth": (341330267, "a26bbcf9b2ad35f048b0fa317234c003f171a4d719760e5c4aff9f793654ebcf"),
    "resnet_152.pth": (None, "e96c459f5317ef2cbb898c91575402da2c78b31a31f55c5d28943683fe0626da"),
    "resnet_200.pth": (507146295, "df58525b0276117169782617a379480d2cbc75230e84e152c603bf22a1fabfa8"),
}


@pytest.fixture(autouse=True)
def only_shipped(monkeypatch):
    monkeypatch.delenv("MED3D_HUB_MANIFEST", raising=False)
    monkeypatch.setattr(manifest, "_added", [])


def raw_entry(**fields) -> dict:
    out = {
        "model": "resnet10",
        "tag": "org",
        "hf_hub_id": "my-org/med3d-weights",
        "revision": "main",
        "filename": "resnet_10.pth",
        "sha256": "ab" * 32,
        "size": 123,
        "format": "medicalnet-pth",
        "shortcut": "B",
        "license": "CC-BY-4.0",
        "source": {"paper": "ours", "datasets": ["internal CT"]},
        "preprocess": copy.deepcopy(MANIFEST_PREPROCESS),
    }
    out.update(fields)
    return out


# -- the shipped manifest -----------------------------------------------------------------------------


def test_shipped_manifest_covers_every_upstream_file_with_its_exact_sha256():
    entries = manifest.read_manifest(manifest.SHIPPED_MANIFEST)
    assert {e.filename: (e.size, e.sha256) for e in entries} == UPSTREAM
    for e in entries:
        depth = e.model.removeprefix("resnet")
        assert e.hf_hub_id == f"TencentMedicalNet/MedicalNet-Resnet{depth}" and e.revision == "main"
        assert e.format == "medicalnet-pth" and e.license == "MIT" and e.in_chans == 1
        assert e.shortcut == ("A" if depth in ("18", "34") else "B")
        assert e.tag == ("23datasets" if "23dataset" in e.filename else "3dseg8")
        assert e.default == (e.tag == "3dseg8")  # each depth's 3DSeg-8 file is its default
        assert e.preprocess == MANIFEST_PREPROCESS and "1904.00625" in e.source["paper"] and e.source["datasets"]
    assert len([e for e in entries if e.tag == "3dseg8" and len(e.source["datasets"]) == 8]) == 7


def test_list_pretrained_and_defaults():
    names = med3d_hub.list_pretrained()
    assert len(names) == 11 and names[0] == "resnet10.3dseg8" and names[-1] == "resnet200.3dseg8"
    assert med3d_hub.list_pretrained("resnet5*") == ["resnet50.3dseg8", "resnet50.23datasets"]
    assert med3d_hub.list_pretrained("*.23datasets") == [f"resnet{d}.23datasets" for d in (10, 18, 34, 50)]
    assert manifest.find_entry("resnet152", None).name == "resnet152.3dseg8"
    assert manifest.find_entry("resnet152", None).size is None


def test_package_manifest_is_a_relative_link_to_the_canonical_file():
    link = REPO_ROOT / "med3d_hub" / "weights_manifest.json"
    assert link.is_symlink() and os.readlink(link) == "../weights_manifest.json"
    assert link.read_bytes() == (REPO_ROOT / "weights_manifest.json").read_bytes()


@pytest.mark.slow
def test_wheel_ships_the_manifest_content(tmp_path):
    # Build from a copy (links kept as links), so the checkout gets no build/ folder.
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        cwd=source,
        check=True,
    )
    [wheel] = tmp_path.glob("med3d_hub-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("med3d_hub/weights_manifest.json")
    assert shipped == (REPO_ROOT / "weights_manifest.json").read_bytes()


def test_docs_table_is_generated_from_the_manifest():
    doc = (REPO_ROOT / "docs" / "pretrained.md").read_text()
    table = manifest.weights_table_markdown(manifest.shipped_entries())
    assert manifest.render_into(doc, table) == doc, "run: python docs/update_weights_table.py"
    for e in manifest.read_manifest(manifest.SHIPPED_MANIFEST):
        assert e.sha256 in doc


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "abc"}, "sha256 must be 64 hexadecimal digits"),
        ({"model": "resnet11"}, "model 'resnet11' is not one of"),
        ({"tag": "v1.0"}, "tag 'v1.0' must be"),
        ({"format": "pickle"}, "format 'pickle' is not one of"),
        ({"shortcut": "C"}, "shortcut must be 'A' or 'B'"),
        ({"size": -1}, "size must be a positive number"),
        ({"sha265": "x"}, "unknown field(s) sha265"),
        ({"hf_hub_id": None}, "the entry has no source"),
        ({"urls": ["ftp://x"]}, "urls must be a list of http(s) URLs"),
        ({"filename": "../etc/passwd"}, "must be a relative path"),
        ({"preprocess": {**MANIFEST_PREPROCESS, "size_mode": "stretch"}}, "preprocess: unknown size_mode"),
        ({"preprocess": {**MANIFEST_PREPROCESS, "intensity": {"method": "magic"}}}, "preprocess: unknown intensity method"),
        ({"source": {"datasets": []}}, "source.paper"),
        ({"in_chans": 0}, "in_chans must be an integer >= 1"),
    ],
)
def test_malformed_entries_are_errors_naming_the_entry(tmp_path, change, message):
    path = write_manifest(tmp_path / "bad.json", raw_entry(tag="fine"), raw_entry(**change))
    with pytest.raises(ManifestError) as info:
        manifest.read_manifest(path)
    text = str(info.value)
    assert str(path) in text and "entry 1" in text and message in text


def test_missing_fields_duplicates_and_double_defaults(tmp_path):
    broken = raw_entry()
    del broken["license"]
    with pytest.raises(ManifestError, match=r"entry 0 \(resnet10.org\): missing field\(s\) license"):
        manifest.read_manifest(write_manifest(tmp_path / "a.json", broken))
    with pytest.raises(ManifestError, match="duplicate of entry 0"):
        manifest.read_manifest(write_manifest(tmp_path / "b.json", raw_entry(), raw_entry()))
    with pytest.raises(ManifestError, match="mark one default per model"):
        manifest.read_manifest(
            write_manifest(tmp_path / "c.json", raw_entry(default=True), raw_entry(tag="two", default=True))
        )


def test_file_level_errors(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        manifest.read_manifest(bad_json)
    with pytest.raises(ManifestError, match="schema_version must be 1"):
        manifest.read_manifest(write_manifest(tmp_path / "v.json", raw_entry(), schema_version=2))
    with pytest.raises(ManifestError, match="cannot read weights manifest"):
        manifest.read_manifest(tmp_path / "absent.json")


# -- merging private manifests ---------------------------------------------------------------------------


def test_env_manifests_extend_and_override_in_order(tmp_path, monkeypatch):
    first = write_manifest(
        tmp_path / "first.json",
        raw_entry(tag="org"),
        raw_entry(model="resnet50", tag="3dseg8", hf_hub_id="my-org/r50-copy", default=True),
    )
    second = write_manifest(tmp_path / "second.json", raw_entry(tag="org", license="internal", default=True))
    monkeypatch.setenv("MED3D_HUB_MANIFEST", os.pathsep.join([str(first), str(second)]))

    assert "resnet10.org" in med3d_hub.list_pretrained() and len(med3d_hub.list_pretrained()) == 12
    org = manifest.find_entry("resnet10", "org")
    assert org.license == "internal" and org.origin == str(second)  # the later manifest wins
    assert manifest.find_entry("resnet10", None).name == "resnet10.org"  # and sets the default
    assert not manifest.find_entry("resnet10", "3dseg8").default
    assert manifest.find_entry("resnet50", "3dseg8").hf_hub_id == "my-org/r50-copy"  # override of a shipped entry

    monkeypatch.setenv("MED3D_HUB_MANIFEST", str(tmp_path / "missing.json"))
    with pytest.raises(ManifestError, match="missing.json, named in MED3D_HUB_MANIFEST, is not a file"):
        med3d_hub.list_pretrained()


def test_add_manifest_validates_at_once_and_is_read_at_each_call(tmp_path):
    path = write_manifest(tmp_path / "mine.json", raw_entry(tag="mine"))
    assert [e.name for e in med3d_hub.add_manifest(path)] == ["resnet10.mine"]
    assert "resnet10.mine" in med3d_hub.list_pretrained()
    path.write_text(json.dumps({"schema_version": 1, "weights": [raw_entry(tag="renamed")]}))
    assert "resnet10.renamed" in med3d_hub.list_pretrained("resnet10.*")

    bad = write_manifest(tmp_path / "bad.json", raw_entry(sha256="0"))
    with pytest.raises(ManifestError, match="bad.json, entry 0"):
        med3d_hub.add_manifest(bad)
    assert all("bad.json" not in str(p) for p in manifest.manifest_paths())
