"""The test servers speak the Hub protocol to the real huggingface_hub client.

Every other Hub test trusts HubServer and the olah mirror; these tests are what earns that trust.
They use the client exactly as the project does (endpoint and cache_dir passed explicitly).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

# These tests check the server against huggingface_hub 2.x and its transport; .ci/compat.sh runs
# the package's own Hub tests on the older generations.
httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub 2.x's transport is not installed")
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub import file_download as hf_file_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http as hf_http
from hub_server import HangingServer, HubServer, closed_port_endpoint, git_blob_sha1

REPO = "med3d/resnet_10"
WEIGHTS = b"\x00weights\x01" * 100  # LFS by its .pth name, though small
CONFIG = b'{"depth": 10}'  # regular: a small .json


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Downloads


def test_downloads_lfs_and_regular_files_into_the_standard_cache_layout(hub_server, hf_cache):
    hub_server.add_file(REPO, "resnet_10.pth", WEIGHTS)
    commit = hub_server.add_file(REPO, "config.json", CONFIG)

    weights = hf_hub_download(REPO, "resnet_10.pth", endpoint=hub_server.endpoint, cache_dir=hf_cache)
    config = hf_hub_download(REPO, "config.json", endpoint=hub_server.endpoint, cache_dir=hf_cache)

    repo_dir = hf_cache / "models--med3d--resnet_10"
    assert Path(weights).read_bytes() == WEIGHTS
    assert Path(config).read_bytes() == CONFIG
    assert weights == str(repo_dir / "snapshots" / commit / "resnet_10.pth")
    assert os.path.realpath(weights) == os.path.realpath(repo_dir / "blobs" / sha256(WEIGHTS))  # LFS: named by sha256
    assert os.path.realpath(config) == os.path.realpath(repo_dir / "blobs" / git_blob_sha1(CONFIG))  # regular: git sha1
    assert (repo_dir / "refs" / "main").read_text() == commit


def test_a_cached_file_is_fetched_once(hub_server, hf_cache):
    hub_server.add_file(REPO, "resnet_10.pth", WEIGHTS)
    for _ in range(2):
        hf_hub_download(REPO, "resnet_10.pth", endpoint=hub_server.endpoint, cache_dir=hf_cache)
    resolve = f"/{REPO}/resolve/main/resnet_10.pth"
    assert hub_server.requests.count(("GET", resolve)) == 1
    assert hub_server.requests.count(("HEAD", resolve)) == 2  # main is re-checked, the bytes are not


def test_older_commits_stay_downloadable_by_sha(hub_server, hf_cache):
    first = hub_server.add_file(REPO, "resnet_10.pth", b"v1" * 50)
    second = hub_server.add_file(REPO, "resnet_10.pth", b"v2" * 50, message="retrain")
    assert hub_server.commits(REPO) == [second, first]
    assert re.fullmatch("[0-9a-f]{40}", first)

    pinned = hf_hub_download(REPO, "resnet_10.pth", revision=first, endpoint=hub_server.endpoint, cache_dir=hf_cache)
    latest = hf_hub_download(REPO, "resnet_10.pth", endpoint=hub_server.endpoint, cache_dir=hf_cache)

    assert Path(pinned).read_bytes() == b"v1" * 50
    assert Path(latest).read_bytes() == b"v2" * 50
    assert f"/snapshots/{first}/" in pinned and f"/snapshots/{second}/" in latest


def test_a_cached_pinned_commit_needs_no_server(hub_server, hf_cache):
    commit = hub_server.add_file(REPO, "resnet_10.pth", WEIGHTS)
    hf_hub_download(REPO, "resnet_10.pth", revision=commit, endpoint=hub_server.endpoint, cache_dir=hf_cache)
    with HangingServer() as silent:  # a request would wait for its timeout; none is made
        path = hf_hub_download(REPO, "resnet_10.pth", revision=commit, endpoint=silent.endpoint, cache_dir=hf_cache)
        assert Path(path).read_bytes() == WEIGHTS
        assert silent.accepted == 0


# Metadata


def test_metadata_reports_the_lfs_sha256(hub_server, hf_cache):
    hub_server.add_file(REPO, "resnet_10.pth", WEIGHTS)
    hub_server.add_file(REPO, "configs/resnet_10.json", CONFIG)
    api = HfApi(endpoint=hub_server.endpoint)

    weights, config = api.get_paths_info(REPO, ["resnet_10.pth", "configs/resnet_10.json", "missing.pth"])
    assert (weights.lfs.sha256, weights.lfs.size, weights.size) == (sha256(WEIGHTS), len(WEIGHTS), len(WEIGHTS))
    assert config.lfs is None and config.blob_id == git_blob_sha1(CONFIG)

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == hub_server.commits(REPO)[0] and info.private is False
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["resnet_10.pth"].lfs.sha256 == sha256(WEIGHTS)
    assert siblings["configs/resnet_10.json"].size == len(CONFIG)

    top = {entry.path for entry in api.list_repo_tree(REPO)}
    everything = {entry.path for entry in api.list_repo_tree(REPO, recursive=True)}
    assert top == {"resnet_10.pth", "configs"}
    assert everything == {"resnet_10.pth", "configs", "configs/resnet_10.json"}


def test_head_reports_what_the_cache_will_name_the_blob(hub_server, hf_cache):
    commit = hub_server.add_file(REPO, "resnet_10.pth", WEIGHTS)
    url = hf_hub_url(REPO, "resnet_10.pth", endpoint=hub_server.endpoint)
    metadata = get_hf_file_metadata(url, endpoint=hub_server.endpoint)
    assert (metadata.etag, metadata.size, metadata.commit_hash) == (sha256(WEIGHTS), len(WEIGHTS), commit)


# Errors


@pytest.mark.parametrize(
    ("repo_id", "filename", "revision", "error"),
    [
        ("med3d/missing", "resnet_10.pth", "main", RepositoryNotFoundError),
        (REPO, "missing.pth", "main", RemoteEntryNotFoundError),
        (REPO, "resnet_10.pth", "v9", RevisionNotFoundError),
        (REPO, "resnet_10.pth", "0" * 40, RevisionNotFoundError),
    ],
)
def test_missing_things_raise_the_clients_error_classes(hub_server, hf_cache, repo_id, filename, revision, error):
    hub_server.add_file(REPO, "resnet_10.pth", WEIGHTS)
    with pytest.raises(error) as caught:
        hf_hub_download(repo_id, filename, revision=revision, endpoint=hub_server.endpoint, cache_dir=hf_cache)
    assert isinstance(caught.value, HfHubHTTPError) and isinstance(caught.value, OSError)
    assert caught.value.response.status_code == 404


def test_serve_corrupted_changes_the_bytes_but_not_the_metadata(hub_server, hf_cache):
    hub_server.add_file(REPO, "resnet_10.pth", WEIGHTS)
    tampered = bytes([WEIGHTS[0] ^ 0xFF]) + WEIGHTS[1:]  # same length: the client's size check passes
    hub_server.serve_corrupted(REPO, "resnet_10.pth", tampered)

    announced = HfApi(endpoint=hub_server.endpoint).get_paths_info(REPO, ["resnet_10.pth"])[0].lfs.sha256
    path = hf_hub_download(REPO, "resnet_10.pth", endpoint=hub_server.endpoint, cache_dir=hf_cache)

    received = Path(path).read_bytes()
    assert announced == sha256(WEIGHTS) == os.path.basename(os.path.realpath(path))
    assert received == tampered and sha256(received) != announced
    assert hub_server.file_bytes(REPO, "resnet_10.pth") == WEIGHTS


# Upload


# huggingface_hub itself PUTs LFS bytes with httpx2's deprecated data=<file>.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_upload_round_trip(hub_server, hf_cache, tmp_path):
    api = HfApi(endpoint=hub_server.endpoint)
    repo_url = api.create_repo("me/finetuned", exist_ok=True)
    assert api.create_repo("me/finetuned", exist_ok=True).repo_id == repo_url.repo_id == "me/finetuned"
    weights = os.urandom(20_000)
    weights_file = tmp_path / "model.safetensors"
    weights_file.write_bytes(weights)  # uploaded from a file, as the client streams it
    readme = b"---\nlicense: mit\n---\n# Fine-tuned Med3D\n"

    api.upload_file(path_or_fileobj=str(weights_file), path_in_repo="model.safetensors", repo_id="me/finetuned")
    info = api.create_commit(
        "me/finetuned",
        [CommitOperationAdd("README.md", readme), CommitOperationAdd("extra/notes.bin", b"notes")],
        commit_message="add card",
    )

    assert info.oid == hub_server.commits("me/finetuned")[0] and len(hub_server.commits("me/finetuned")) == 3
    assert hub_server.file_bytes("me/finetuned", "model.safetensors") == weights
    assert ("POST", "/api/validate-yaml") in hub_server.requests
    assert any(method == "PUT" for method, _ in hub_server.requests)  # the LFS bytes went to the upload href
    for name, data in [("model.safetensors", weights), ("README.md", readme), ("extra/notes.bin", b"notes")]:
        path = hf_hub_download("me/finetuned", name, endpoint=hub_server.endpoint, cache_dir=hf_cache)
        assert Path(path).read_bytes() == data

    again = api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id="me/finetuned")
    assert again.oid == info.oid  # unchanged content: the client skips the commit


def test_private_flag(hub_server, hf_cache):
    api = HfApi(endpoint=hub_server.endpoint)
    api.create_repo("me/secret", private=True)
    api.create_repo("me/open")
    assert hub_server.repo_private("me/secret") and api.model_info("me/secret").private is True
    assert not hub_server.repo_private("me/open") and api.model_info("me/open").private is False


def test_require_token(hf_cache):
    with HubServer(require_token="hf_test_secret") as hub:
        hub.add_file(REPO, "resnet_10.pth", WEIGHTS)
        with pytest.raises(HfHubHTTPError) as caught:
            hf_hub_download(REPO, "resnet_10.pth", endpoint=hub.endpoint, cache_dir=hf_cache)
        assert caught.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info(REPO)
        path = hf_hub_download(
            REPO, "resnet_10.pth", endpoint=hub.endpoint, cache_dir=hf_cache, token="hf_test_secret"
        )
        assert Path(path).read_bytes() == WEIGHTS


# olah


def test_olah_serves_downloads_pins_and_lfs_sha256(olah_mirror, hf_cache):
    first = olah_mirror.add_repo("med3d/olah_resnet", {"resnet_10.pth": b"v1" * 80, "config.json": CONFIG})
    second = olah_mirror.add_repo("med3d/olah_resnet", {"resnet_10.pth": WEIGHTS}, message="retrain")
    endpoint = olah_mirror.endpoint

    latest = hf_hub_download("med3d/olah_resnet", "resnet_10.pth", endpoint=endpoint, cache_dir=hf_cache)
    pinned = hf_hub_download(
        "med3d/olah_resnet", "resnet_10.pth", revision=first, endpoint=endpoint, cache_dir=hf_cache
    )
    config = hf_hub_download("med3d/olah_resnet", "config.json", endpoint=endpoint, cache_dir=hf_cache)

    assert Path(latest).read_bytes() == WEIGHTS and f"/snapshots/{second}/" in latest
    assert Path(pinned).read_bytes() == b"v1" * 80 and f"/snapshots/{first}/" in pinned
    assert Path(config).read_bytes() == CONFIG
    assert os.path.basename(os.path.realpath(latest)) == sha256(WEIGHTS)
    info = HfApi(endpoint=endpoint).get_paths_info("med3d/olah_resnet", ["resnet_10.pth"], revision="main")
    assert info[0].lfs.sha256 == sha256(WEIGHTS)


@pytest.mark.parametrize(
    ("repo_id", "filename", "revision"),
    [("med3d/olah_missing", "resnet_10.pth", "main"), ("med3d/olah_errors", "missing.pth", "main"),
     ("med3d/olah_errors", "resnet_10.pth", "v9")],
)  # fmt: skip
def test_olah_reports_every_missing_thing_as_a_missing_repo(olah_mirror, hf_cache, repo_id, filename, revision):
    olah_mirror.add_repo("med3d/olah_errors", {"resnet_10.pth": WEIGHTS})
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, filename, revision=revision, endpoint=olah_mirror.endpoint, cache_dir=hf_cache)


# Dead endpoints


def test_a_closed_port_is_refused_at_once_but_hf_hub_download_retries_for_23_s(hf_cache, monkeypatch):
    endpoint = closed_port_endpoint()
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=sleeps.append))
    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=endpoint).model_info(REPO)
    assert sleeps == []  # API calls do not retry

    with pytest.raises(LocalEntryNotFoundError) as caught:
        hf_hub_download(REPO, "resnet_10.pth", endpoint=endpoint, cache_dir=hf_cache, etag_timeout=1)
    assert isinstance(caught.value.__cause__, httpx2.ConnectError)
    # An uncached file is retried with backoff: 23 s of sleeping that etag_timeout does not shorten.
    assert sleeps == [1, 2, 4, 8, 8]


def test_a_hanging_server_is_cut_off_only_by_a_timeout(hf_cache, monkeypatch):
    with HangingServer() as hanging:
        with pytest.raises(httpx2.TimeoutException):  # the server never answers: only the timeout ends the call
            HfApi(endpoint=hanging.endpoint).model_info(REPO, timeout=0.3)
        assert hanging.accepted == 1  # API calls do not retry

        # hf_hub_download's retries use a fixed 60 s timeout, whatever etag_timeout says; shorten it here.
        monkeypatch.setattr(hf_file_download, "_ETAG_RETRY_TIMEOUT", 0.1)
        monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None))
        with pytest.raises(LocalEntryNotFoundError) as caught:
            hf_hub_download(REPO, "resnet_10.pth", endpoint=hanging.endpoint, cache_dir=hf_cache, etag_timeout=0.1)
        assert isinstance(caught.value.__cause__, httpx2.TimeoutException)
        assert hanging.accepted >= 7  # one HEAD, then six more with retries
