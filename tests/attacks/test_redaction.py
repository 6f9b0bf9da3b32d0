"""Case 2: no token in any message, log line or traceback, even when a server echoes it back."""

from __future__ import annotations

import logging

import pytest
from hub_server import HubServer, _json

import med3d_hub
from med3d_hub.cli import app as cli
from med3d_hub.weights import hub, manifest
from med3d_hub.weights.model_files import write_model_files

TOKEN = "hf_" + "Qw3rTy" * 6  # token-shaped, as the Hub issues them


class EchoingHub(HubServer):
    """A Hub whose LFS batch answer puts a per-object error holding the request's Authorization header."""

    def _lfs_batch(self, repo_id: str, payload: dict):
        objects = [{"oid": o["oid"], "size": o["size"],
                    "error": {"code": 422, "message": f"rejected; request headers: Authorization: Bearer {TOKEN}"}}
                   for o in payload["objects"]]
        return _json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")


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


@pytest.mark.parametrize("debug", [False, True])
def test_publish_never_prints_a_token_the_server_echoes(hf_cache, tmp_path, monkeypatch, capsys, debug):
    folder = tmp_path / "model"
    folder.mkdir()
    write_model_files(folder, med3d_hub.create_model("resnet10", num_classes=0))
    with EchoingHub(require_token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("MED3D_HUB_MANIFEST", raising=False)
        monkeypatch.setattr(manifest, "_added", [])
        args = ["publish", str(folder), "--repo-id", "med3d-test/echo", "--tag", "echo", "--license", "mit",
                "--manifest", str(tmp_path / "m.json"), *(["--debug"] if debug else [])]
        code = cli.main(args)
    out = capsys.readouterr()
    assert code != 0
    assert TOKEN not in out.err + out.out
    assert not (tmp_path / "m.json").exists()


def test_log_lines_through_the_command_are_redacted(monkeypatch, capsys):
    restore = cli._configure_logging(quiet=False, debug=False)
    try:
        logging.getLogger("med3d_hub.weights.hub").warning("server said: Authorization: Bearer %s", TOKEN)
    finally:
        restore()
    err = capsys.readouterr().err
    assert "Bearer ***" in err and TOKEN not in err
