"""Pytest fixtures for tests that talk to a Hub: a HubServer, an olah mirror, and a private HF cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import HubServer
from olah_mirror import OlahMirror, find_olah_cli

__all__ = ["hf_cache", "hub_server", "olah_mirror", "sleeps"]

# Module attributes huggingface_hub computes from the environment at import time; they are patched
# too, because setting HF_HOME after the import changes nothing for the running process.
_HF_PATH_CONSTANTS = {
    "HF_HOME": "",
    "HF_HUB_CACHE": "hub",
    "HUGGINGFACE_HUB_CACHE": "hub",
    "HF_ASSETS_CACHE": "assets",
    "HUGGINGFACE_ASSETS_CACHE": "assets",
    "HF_XET_CACHE": "xet",
    "HF_TOKEN_PATH": "token",
    "HF_STORED_TOKENS_PATH": "stored_tokens",
    "CHECK_FOR_UPDATE_DONE_PATH": ".check_for_update_done",
    "CHECK_FOR_SKILL_UPDATE_DONE_PATH": ".check_for_skill_update_done",
    "AGENT_HARNESSES_PATH": ".agent_harnesses.json",
}


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A started HubServer with no repos, stopped after the test."""
    with HubServer() as server:
        yield server


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ``time.sleep`` of the test, recorded instead of slept: a retry with backoff shows up here."""
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


@pytest.fixture(scope="session")
def olah_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OlahMirror]:
    """One olah process for the session (it takes about a second to start); tests add their own repos."""
    if find_olah_cli() is None:
        pytest.skip("olah-cli is not installed (pip install 'med3d-hub[test]')")
    with OlahMirror(tmp_path_factory.mktemp("olah")) as mirror:
        yield mirror


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HF_HOME and HF_HUB_CACHE at a fresh directory for this test; return the hub cache directory.

    Both the environment (for subprocesses and code that reads it late) and huggingface_hub's constants
    (read at import) are patched. HF_TOKEN is removed and the token file moves with HF_HOME, so no real
    credential reaches a test server.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._cache_manager as cache_manager  # scan_cache_dir's default, copied at import

    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(variable, raising=False)
    for name, relative in _HF_PATH_CONSTANTS.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(home / relative) if relative else str(home))
    monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", str(home / "hub"), raising=False)
    return home / "hub"
