"""Writing manifests: add_entry / manifest_with_entry / write_manifest, atomic and validated."""

from __future__ import annotations

import json

import pytest
from medicalnet_files import entry, medicalnet_bytes, write_manifest

from med3d_hub.weights.manifest import EntryExistsError, ManifestError, add_entry, manifest_with_entry, read_manifest

DATA = medicalnet_bytes("resnet10")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_add_entry_creates_then_extends_a_manifest(tmp_path):
    path = tmp_path / "weights.json"
    first = add_entry(path, entry("resnet10", "a", DATA, default=True))
    assert first.name == "resnet10.a" and first.default and first.origin == str(path)
    add_entry(path, entry("resnet10", "b", DATA))
    assert [e.name for e in read_manifest(path)] == ["resnet10.a", "resnet10.b"]
    assert json.loads(path.read_text())["schema_version"] == 1 and _leftovers(tmp_path) == []


def test_an_existing_name_is_refused_unless_replaced_and_replacing_keeps_the_order(tmp_path):
    path = write_manifest(tmp_path / "weights.json", entry("resnet10", "a", DATA), entry("resnet10", "b", DATA))
    before = path.read_bytes()
    with pytest.raises(EntryExistsError, match="already has resnet10.a"):
        add_entry(path, entry("resnet10", "a", DATA, description="new"))
    assert path.read_bytes() == before
    add_entry(path, entry("resnet10", "a", DATA, description="new"), replace=True)
    entries = read_manifest(path)  # read right after the rewrite: the cache must see the new file
    assert [(e.tag, e.description) for e in entries] == [("a", "new"), ("b", "")]


def test_a_new_default_clears_the_old_one(tmp_path):
    path = write_manifest(tmp_path / "weights.json", entry("resnet10", "a", DATA, default=True),
                          entry("resnet18", "x", DATA, default=True))
    add_entry(path, entry("resnet10", "b", DATA, default=True))
    assert {e.name for e in read_manifest(path) if e.default} == {"resnet10.b", "resnet18.x"}


def test_nothing_is_written_for_an_invalid_entry_or_a_broken_manifest(tmp_path):
    path = write_manifest(tmp_path / "weights.json", entry("resnet10", "a", DATA))
    before = path.read_bytes()
    with pytest.raises(ManifestError, match="sha256 must be 64 hexadecimal digits"):
        add_entry(path, entry("resnet10", "b", DATA, sha256="abc"))
    with pytest.raises(ManifestError, match="tag"):
        manifest_with_entry(path, entry("resnet10", "B.2", DATA))
    assert path.read_bytes() == before and _leftovers(tmp_path) == []

    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1, "weights": [{"model": "resnet10"}]}')
    with pytest.raises(ManifestError, match="missing field"):
        add_entry(broken, entry("resnet10", "b", DATA))
    assert broken.read_text() == '{"schema_version": 1, "weights": [{"model": "resnet10"}]}'
