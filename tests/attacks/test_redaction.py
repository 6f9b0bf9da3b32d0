"""Case 2: no token in any message, log line or traceback, even when a server echoes it back."""

from __future__ import annotations

import logging

import pytest
from hub_server import HubServer

import med3d_hub
from med3d_hub.cli import app as cli
from med3d_hub.errors import EXIT_PUBLISH_FAILED
from med3d_hub.weights import hub, manifest
from med3d_hub.weights.model_files import write_model_files

TOKEN = "hf_" + "Qw3rTy" * 6  # token-shaped, as the Hub issues them


ECHOED = f"rejected; request headers: Authorization: Bearer {TOKEN}"  # a Hub answer that echoes the token


@pytest.mark.parametrize("text", [
    f"Authorization: Bearer {TOKEN}", f"token={TOKEN}", f"'authorization': 'Bearer {TOKEN}'", f"basic {TOKEN[3:]}",
    "api_org_" + "x" * 30,
])
def test_redact_removes_token_shapes(text):
    out = hub.redact(text)
    assert TOKEN not in out and TOKEN[3:] not in out and "api_org_xxxxxxxx" not in out
    assert "***" in out


def test_redact_removes_the_value_of_hf_token_whatever_its_shape(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    assert hub.redact("sent plain-secret-value to the Hub") == "sent *** to the Hub"


def test_redact_keeps_ordinary_text():
    text = "sha256 mismatch for resnet_10.pth: expected 0a1b, got 2c3d (tokenizer, bearer of bad news)"
    assert hub.redact(text) == text


def _publish_to(server: HubServer, tmp_path, monkeypatch, *extra: str) -> int:
    """``med3d publish`` of a saved resnet10 folder to ``server``, with HF_TOKEN set; its exit code."""
    folder = tmp_path / "model"
    if not folder.exists():
        folder.mkdir()
        write_model_files(folder, med3d_hub.create_model("resnet10", num_classes=0))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("MED3D_HUB_MANIFEST", raising=False)
    monkeypatch.setattr(manifest, "_added", [])
    return cli.main(["publish", str(folder), "--repo-id", "med3d-test/echo", "--tag", "echo", "--license", "mit",
                     "--manifest", str(tmp_path / "m.json"), *extra])


@pytest.mark.parametrize("debug", [False, True])
def test_publish_never_prints_a_token_the_server_echoes(hf_cache, tmp_path, monkeypatch, capsys, debug):
    with HubServer(require_token=TOKEN) as server:
        server.refuse_lfs = ("batch", 422, ECHOED)
        code = _publish_to(server, tmp_path, monkeypatch, *(["--debug"] if debug else []))
    out = capsys.readouterr()
    assert code == EXIT_PUBLISH_FAILED, out.err
    assert TOKEN not in out.err + out.out
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("where, status", [("batch", 422), ("put", 403)])
def test_an_lfs_upload_the_hub_refuses_is_a_publish_failure_with_the_hubs_message(
        hf_cache, tmp_path, monkeypatch, capsys, where, status):
    """The Hub refuses the weights' bytes (a quota, a size limit): exit 4, its reason, no token, no entry."""
    with HubServer(require_token=TOKEN) as server:
        server.refuse_lfs = (where, status, f"storage quota exceeded for med3d-test; {ECHOED}")
        code = _publish_to(server, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == EXIT_PUBLISH_FAILED, err
    assert "storage quota exceeded for med3d-test" in err and "model.safetensors" in err, err
    assert "internal error" not in err and TOKEN not in err and "Bearer ***" in err
    assert "m.json was not changed" in err and not (tmp_path / "m.json").exists()


def test_log_lines_through_the_command_are_redacted(monkeypatch, capsys):
    restore = cli._configure_logging(quiet=False, debug=False)
    try:
        logging.getLogger("med3d_hub.weights.hub").warning("server said: Authorization: Bearer %s", TOKEN)
    finally:
        restore()
    err = capsys.readouterr().err
    assert "Bearer ***" in err and TOKEN not in err
