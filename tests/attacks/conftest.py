"""The reliability suite: attacks on the installed package that must keep failing safely.

Every test here is marked ``attacks`` (run them alone with ``pytest -m attacks``); the fast ones
run in the default suite too. Fixtures shared with the rest of the tests (a Hub server, a private
Hugging Face cache) come from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from med3d_hub.weights import manifest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.attacks)


@pytest.fixture
def env(hf_cache, hub_server, monkeypatch):
    """The Hub server as HF_ENDPOINT, fresh caches, only the shipped manifest, no token."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    for name in ("MED3D_HUB_MANIFEST", "MED3D_HUB_CACHE", "MED3D_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(manifest, "_added", [])
    return hub_server


@pytest.fixture
def our_cache(hf_cache: Path) -> Path:
    """The package's cache root in this test (``$HF_HOME/med3d_hub``)."""
    return hf_cache.parent / "med3d_hub"
