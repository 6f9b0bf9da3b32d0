"""olah, a real self-hosted Hub mirror, serving local git repos on 127.0.0.1, for tests.

HubServer is our reading of the protocol; olah is someone else's. Downloads that work against both
are not tied to one server's quirks. olah runs in offline mode, so it serves only the git repos under
``mirrors/models/<org>/<name>``; its upstream addresses point at a closed local port, so nothing can
leak to huggingface.co even if offline mode were ignored.

Repos are plain git: LFS files are committed as pointer files, with their bytes under
``.git/lfs/objects/<oid[:2]>/<oid[2:4]>/<oid>``, which is where olah looks; no git-lfs binary is
needed. olah opens the git repo on every request, so repos and commits can be added before or after
``start()``, and a new commit on main is served at once.

Known differences from the Hub: olah accepts no uploads, answers ``model_info`` without a revision
with a 401, and reports a missing repo, file or revision alike as a 401 that the client raises as
``RepositoryNotFoundError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from hub_server import LFS_SUFFIXES, closed_port_endpoint, is_lfs, lfs_pointer

_GIT_ENV = {
    # A fixed identity and no user or system config: no hooks, signing or git-lfs filters get involved.
    "GIT_AUTHOR_NAME": "med3d-hub tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "med3d-hub tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def find_olah_cli() -> str | None:
    """The olah-cli next to this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "olah-cli"
    return str(beside) if beside.exists() else shutil.which("olah-cli")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OlahMirror:
    """An olah process in offline mode over git repos kept in ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, *, startup_timeout: float = 30.0):
        self.workdir = Path(workdir).resolve()
        self.startup_timeout = startup_timeout
        self.endpoint = ""
        self._process: subprocess.Popen | None = None
        self._log_path = self.workdir / "olah.log"

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, message: str = "add files") -> str:
        """Commit ``files`` to repo ``org/name`` on branch main, creating it if needed; return the commit sha.

        Files already in the repo and not named in ``files`` are kept, so a second call makes a new
        commit on top of the first (older commits stay reachable by sha).
        """
        org, name = repo_id.split("/")  # olah only serves namespaced repos
        repo_dir = self.workdir / "mirrors" / "models" / org / name
        if not (repo_dir / ".git").exists():
            repo_dir.mkdir(parents=True)
            self._git(repo_dir, "init", "--quiet", "--initial-branch=main")
        attributes = {f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in LFS_SUFFIXES}
        gitattributes = repo_dir / ".gitattributes"
        if gitattributes.exists():
            attributes.update(gitattributes.read_text().splitlines())
        for path, data in files.items():
            target = repo_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_lfs(path, len(data)):
                oid = hashlib.sha256(data).hexdigest()
                obj = repo_dir / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
                obj.parent.mkdir(parents=True, exist_ok=True)
                obj.write_bytes(data)
                target.write_bytes(lfs_pointer(data))
                if not path.endswith(LFS_SUFFIXES):
                    attributes.add(f"{path} filter=lfs diff=lfs merge=lfs -text")
            else:
                target.write_bytes(data)
        gitattributes.write_text("".join(f"{line}\n" for line in sorted(attributes)))
        self._git(repo_dir, "add", "--all")
        self._git(repo_dir, "commit", "--quiet", "--allow-empty", "-m", message)
        return self._git(repo_dir, "rev-parse", "HEAD").strip()

    @staticmethod
    def _git(repo_dir: Path, *args: str) -> str:
        env = {**os.environ, **_GIT_ENV}
        done = subprocess.run(["git", *args], cwd=repo_dir, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed in {repo_dir}:\n{done.stderr}")
        return done.stdout

    def start(self) -> OlahMirror:
        olah_cli = find_olah_cli()
        if olah_cli is None:
            raise RuntimeError("olah-cli is not installed (pip install olah)")
        port = _free_port()
        upstream = closed_port_endpoint().removeprefix("http://")
        (self.workdir / "mirrors").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f"repos-path = {json.dumps(str(self.workdir / 'repos'))}\n"
            f"mirrors-path = [{json.dumps(str(self.workdir / 'mirrors'))}]\n"
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
            'hf-scheme = "http"\n'
            f'hf-netloc = "{upstream}"\n'
            f'hf-lfs-netloc = "{upstream}"\n'
            "\n[accessibility]\n"
            "offline = true\n"
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                [olah_cli, "-c", str(config)], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        """Poll until olah answers HTTP at all (any status); fail with its log if it exits or takes too long."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"olah exited with status {self._process.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/models/none/none/revision/main", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # an HTTP error status is still an answer
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah did not answer on {self.endpoint} within {self.startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        """What olah printed so far."""
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def __enter__(self) -> OlahMirror:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
