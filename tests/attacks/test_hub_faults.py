"""A Hub that misbehaves: every download ends on a limit it names, keeps no bytes, and says what to do.

Each test points the real loading code (``create_model(..., pretrained="hf://...")``) at a server on
127.0.0.1 that answers the metadata request like a Hub and then fails in one way: it never answers,
stalls mid-body, drips, cuts the body and ignores Range, answers 500 or 404, or sends other bytes
than it announced. The limits are set short where the default would only make the test slow; the
error must name the limit that ended the download and the ways out.
"""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hub_server import HangingServer

import med3d_hub
from med3d_hub.weights import hub

pytestmark = pytest.mark.hub

REPO = "med3d-faults/weights"
FILE = "resnet_10.pth"
COMMIT = "c" * 40
DATA = os.urandom(16 << 20)  # larger than the memory a streamed download may use
SHA256 = hashlib.sha256(DATA).hexdigest()


class FaultyHub:
    """Answers HEAD like a Hub for one LFS file, and GET with the fault it was made with."""

    def __init__(self, fault: str):
        self.fault = fault
        self.gets: list[str | None] = []  # the Range header of each GET
        self.stopping = threading.Event()
        hub_self = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub_self.head(self)

            def do_GET(self):
                hub_self.gets.append(self.headers.get("Range"))
                hub_self.get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FaultyHub:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def head(self, h: BaseHTTPRequestHandler) -> None:
        if self.fault == "500":
            h.send_response(500)
            h.send_header("Content-Length", "0")
        elif self.fault == "404":
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
        else:
            h.send_response(200)
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("ETag", f'"{SHA256}"')
            h.send_header("X-Linked-Etag", f'"{SHA256}"')
            h.send_header("X-Linked-Size", str(len(DATA)))
            h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()

    def get(self, h: BaseHTTPRequestHandler) -> None:
        body = memoryview(DATA[::-1] if self.fault == "wrong bytes" else DATA)  # same size, other bytes; no copies
        h.send_response(200)  # Range is ignored: always the whole file
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        half = len(body) // 2
        if self.fault == "stall":
            h.wfile.write(body[:half])
            h.wfile.flush()
            self.stopping.wait(60)
        elif self.fault == "drip":
            for i in range(len(body)):
                if self.stopping.wait(0.05):
                    return
                h.wfile.write(body[i : i + 1])
                h.wfile.flush()
        elif self.fault == "cut":
            h.wfile.write(body[:half])
            h.wfile.flush()
            h.close_connection = True
        else:
            h.wfile.write(body)


@pytest.fixture
def env(hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MED3D_HUB_CACHE", str(tmp_path / "med3d_cache"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hf_cache


def _load(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> BaseException:
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(OSError) as caught:
        med3d_hub.create_model("resnet10", pretrained=f"hf://{REPO}/{FILE}")
    return caught.value


def _nothing_kept(hf_cache: Path) -> None:
    kept = [p for p in hf_cache.rglob("*") if p.is_file()]
    assert not kept, f"a failed download left files behind: {kept}"


WAYS_OUT = ("HF_ENDPOINT", "pretrained='/path/to/resnet_10.pth'", "HF_HUB_OFFLINE=1")


def _names_ways_out(message: str) -> None:
    for way in WAYS_OUT:
        assert way in message, f"{way!r} is missing from: {message}"


def test_silent_server(env, monkeypatch):
    with HangingServer() as server:
        error = _load(server.endpoint, monkeypatch)
        assert server.accepted == 1, "a silent server is not asked again"
    assert isinstance(error, hub.HubUnreachableError)
    assert "timeout 2 s" in str(error)
    _names_ways_out(str(error))


def test_stall_mid_body(env, monkeypatch):
    with FaultyHub("stall") as server:
        error = _load(server.endpoint, monkeypatch)
    assert isinstance(error, hub.HubUnreachableError)
    assert "went silent" in str(error) and "HF_HUB_DOWNLOAD_TIMEOUT" in str(error)
    assert len(server.gets) == 1, "a stalled server is not asked again"
    _names_ways_out(str(error))
    _nothing_kept(env)


@pytest.mark.slow
def test_stall_mid_body_with_the_default_limits_ends_on_the_default_silence(env, monkeypatch):
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT")
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT")
    with FaultyHub("stall") as server:
        error = _load(server.endpoint, monkeypatch)
    assert isinstance(error, hub.HubUnreachableError) and "went silent" in str(error)
    assert "Limits: 10 s of silence (HF_HUB_DOWNLOAD_TIMEOUT)" in str(error)
    assert len(server.gets) == 1, "a stalled server is not asked again"


def test_drip_is_ended_by_the_deadline(env, monkeypatch):
    monkeypatch.setenv("MED3D_HUB_DOWNLOAD_DEADLINE", "3")
    with FaultyHub("drip") as server:
        error = _load(server.endpoint, monkeypatch)
    assert isinstance(error, hub.HubUnreachableError)
    assert "deadline of 3 s" in str(error) and "MED3D_HUB_DOWNLOAD_DEADLINE" in str(error)
    _names_ways_out(str(error))
    _nothing_kept(env)


def test_cut_without_range_is_retried_a_bounded_number_of_times_in_flat_memory(env, monkeypatch):
    monkeypatch.setenv("MED3D_HUB_DOWNLOAD_RETRIES", "2")
    tracemalloc.start()
    try:
        with FaultyHub("cut") as server:
            error = _load(server.endpoint, monkeypatch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(error, hub.HubUnreachableError)
    assert len(server.gets) == 3, f"1 try and 2 resumptions, got {len(server.gets)} GETs"
    assert server.gets[1] is not None and server.gets[1].startswith("bytes="), "a resumption asks for the rest"
    assert peak < len(DATA) // 2, f"{peak} bytes held while downloading a {len(DATA)}-byte file"
    assert "cut too often" in str(error) and "MED3D_HUB_DOWNLOAD_RETRIES" in str(error)
    _names_ways_out(str(error))
    _nothing_kept(env)


def test_server_error_500(env, monkeypatch):
    with FaultyHub("500") as server:
        error = _load(server.endpoint, monkeypatch)
    assert isinstance(error, hub.HubUnreachableError)
    assert "HTTP 500" in str(error)
    assert server.gets == [], "nothing is downloaded from a failing server"
    _names_ways_out(str(error))


def test_missing_file_404(env, monkeypatch):
    with FaultyHub("404") as server:
        error = _load(server.endpoint, monkeypatch)
    assert isinstance(error, hub.WeightsDownloadError)
    assert f"{FILE} does not exist in {REPO}@main" in str(error)


def test_wrong_bytes_are_refused_and_not_kept(env, monkeypatch):
    with FaultyHub("wrong bytes") as server:
        error = _load(server.endpoint, monkeypatch)
    assert isinstance(error, hub.ChecksumError)
    assert SHA256 in str(error) and hashlib.sha256(DATA[::-1]).hexdigest() in str(error)
    _nothing_kept(env)


def test_limits_are_settings(monkeypatch):
    monkeypatch.setenv("MED3D_HUB_DOWNLOAD_DEADLINE", "90")
    monkeypatch.setenv("MED3D_HUB_DOWNLOAD_RETRIES", "0")
    s = hub.settings()
    assert (s.download_deadline, s.download_retries) == (90.0, 0)
    monkeypatch.setenv("MED3D_HUB_DOWNLOAD_RETRIES", "-1")
    with pytest.raises(ValueError, match="MED3D_HUB_DOWNLOAD_RETRIES"):
        hub.settings()
