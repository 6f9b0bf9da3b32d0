"""The Hub's and the network's failures, as the package's errors, and messages that carry no secret.

``redact`` removes tokens from everything the package prints or logs; ``not_served`` turns the
Hub's ``X-Error-Code`` into words; ``transport_errors`` names huggingface_hub's transport errors
whatever its generation, for ``except`` clauses.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ...errors import EXIT_UNREACHABLE, Med3DError

if TYPE_CHECKING:
    from .environment import Settings
    from .names import HubFile

__all__ = [
    "ChecksumError",
    "HubUnreachableError",
    "Refused",
    "WeightsDownloadError",
    "mismatch",
    "not_served",
    "reason",
    "redact",
    "transport_errors",
    "ways_out",
]


class HubUnreachableError(Med3DError, ConnectionError):
    """No server could be reached (or offline mode is on) and no verified cached copy exists."""

    exit_code = EXIT_UNREACHABLE


class ChecksumError(Med3DError, OSError):
    """A file's sha256 differs from the expected one; the bad bytes were removed from the caches."""


class WeightsDownloadError(Med3DError, OSError):
    """The server answered, but not with the file: missing repo, revision or file, no access, a broken transfer."""


_TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
_HUB_TOKEN = re.compile(r"(?<![A-Za-z0-9])(?:hf_|api_org_)[A-Za-z0-9]{8,}")  # user and organisation tokens
_AUTH_VALUE = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")  # an Authorization header's value


def redact(text: object, *secrets: str | None) -> str:
    """``text`` with anything token-shaped, the token environment variables' values and ``secrets`` replaced by ***.

    Every message, log line and traceback the package emits goes through here, since a server may
    echo the request's ``Authorization`` header in its error.
    """
    out = str(text)
    values = [os.environ.get(name) for name in _TOKEN_ENVS] + list(secrets)
    for value in sorted({v for v in values if isinstance(v, str) and len(v) >= 4}, key=len, reverse=True):
        out = out.replace(value, "***")
    out = _AUTH_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", out)
    return _HUB_TOKEN.sub("***", out)


def mismatch(what: str, expected: str, actual: str, removed: Sequence[Path], why: str) -> ChecksumError:
    gone = (
        "The bad copy was removed from the cache: " + ", ".join(str(p) for p in removed) + "."
        if removed
        else "Nothing was kept."
    )
    return ChecksumError(f"sha256 mismatch for {what}: expected {expected}, got {actual}. {gone} {why}")


class Refused(Exception):
    """The Hub answered with an error status; ``code`` is its X-Error-Code (RepoNotFound, EntryNotFound...)."""

    def __init__(self, status: int, code: str | None):
        super().__init__(f"HTTP {status} {code or ''}".strip())
        self.status, self.code = status, code


def not_served(f: HubFile, url: str, refused: Refused) -> WeightsDownloadError:
    """The Hub's refusal in words, from its X-Error-Code (the header huggingface_hub maps to its error classes)."""
    if refused.code == "GatedRepo":
        what = f"{f.repo_id} is gated: accept its conditions on the Hub and set HF_TOKEN"
    elif refused.code == "RepoNotFound":
        what = f"repo {f.repo_id} was not found (or is private: set HF_TOKEN)"
    elif refused.code == "RevisionNotFound":
        what = f"revision {f.revision!r} does not exist in {f.repo_id}"
    elif refused.code == "EntryNotFound":
        what = f"{f.filename} does not exist in {f.repo_id}@{f.revision}"
    else:
        hint = "; check HF_TOKEN" if refused.status in (401, 403) else ""
        what = f"the server refused it (HTTP {refused.status}){hint}"
    return WeightsDownloadError(f"cannot download {url}: {what}")


def ways_out(s: Settings, filename: str) -> str:
    return (
        f"Ways out: point HF_ENDPOINT at a reachable Hub or mirror (now {s.endpoint}); "
        f"or load a local copy with create_model(name, pretrained='/path/to/{filename or 'weights.pth'}'); "
        "or use the offline cache: load once with network access, then set HF_HUB_OFFLINE=1 "
        f"(caches: {s.hub_cache} and {s.cache})."
    )


def reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().rstrip(":")


def transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors huggingface_hub's HTTP client can raise, for ``except`` clauses.

    Its transport changed with each generation: requests in 0.x (whose errors are OSErrors), httpx in
    1.x, httpx2 in 2.x (each with a ``TransportError``). They are read from the modules already
    loaded, so no transport is imported, and none is needed that the installed client lacks.
    """
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "TransportError", None), type):
            errors.append(module.TransportError)
    return tuple(errors)
