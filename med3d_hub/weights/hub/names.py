"""Hub names that become paths: repo ids, revisions and filenames checked before they reach a cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ...errors import UsageError

__all__ = ["HubFile", "check_hub_file", "parse_hf_reference", "resolve_url"]


_REVISION_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\%]|\.\.|@\{|//")
_FILENAME_BAD = re.compile(r"[\x00-\x1f\x7f\\]")


def check_hub_file(repo_id: object, revision: object, filename: object, *, where: str = "") -> None:
    """Refuse a repo id, revision or filename the Hub would not accept, before it becomes a path in a cache.

    The repo id follows ``huggingface_hub.utils.validate_repo_id`` (and must be ``org/name``); a
    revision follows git's ref rules (no ``..``, no component starting with ``.``, no ``\\``, ``%``,
    spaces or ``~^:?*[``); a filename is a relative POSIX path without ``.``/``..`` components.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    prefix = f"{where}: " if where else ""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise UsageError(f"{prefix}repo id {repo_id!r} must be 'org/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{prefix}repo id {repo_id!r} is not a valid Hub repo id: {error}") from None
    if (
        not isinstance(revision, str)
        or not revision
        or len(revision) > 255
        or _REVISION_BAD.search(revision)
        or revision.endswith(("/", ".", ".lock"))
        or any(part.startswith(".") or not part for part in revision.split("/"))
        or revision == "@"
    ):
        raise UsageError(
            f"{prefix}revision {revision!r} is not a valid branch, tag or commit sha "
            "(git ref rules: no '..', no part starting with '.', no spaces, '\\', '%' or '~^:?*[')"
        )
    parts = filename.split("/") if isinstance(filename, str) else []
    if (
        not parts
        or len(filename) > 1024
        or _FILENAME_BAD.search(filename)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UsageError(
            f"{prefix}filename {filename!r} must be a relative path inside the repo (no '..', '.', empty parts, "
            "leading '/' or '\\'), e.g. 'resnet_50.pth'"
        )


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub model repo at a revision (a branch, tag or commit sha)."""

    repo_id: str
    filename: str
    revision: str = "main"

    def __post_init__(self) -> None:
        check_hub_file(self.repo_id, self.revision, self.filename)

    def __str__(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}/{self.filename}"


def parse_hf_reference(ref: str) -> HubFile:
    """``hf://org/repo[@revision]/path/in/repo`` -> HubFile. A revision containing '/' is written %2F-quoted."""
    body = ref[len("hf://") :] if ref.startswith("hf://") else ref
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise UsageError(
            f"cannot read Hub reference {ref!r}: expected hf://org/repo@revision/path/to/file "
            "(the @revision part is optional, default main)"
        )
    repo_name, _, revision = parts[1].partition("@")
    if not repo_name or (parts[1].endswith("@")):
        raise UsageError(f"cannot read Hub reference {ref!r}: empty repo name or revision")
    try:
        return HubFile(f"{parts[0]}/{repo_name}", "/".join(parts[2:]), unquote(revision) or "main")
    except ValueError as error:
        raise UsageError(f"cannot use Hub reference {ref!r}: {error}") from None


def resolve_url(f: HubFile, endpoint: str) -> str:
    """The Hub protocol's address of one file at one revision on ``endpoint``.

    Built here rather than by ``hf_hub_url``: huggingface_hub 0.x starts from the endpoint it read at
    import time and swaps in ``endpoint`` only when the two agree on their prefix.
    """
    return f"{endpoint.rstrip('/')}/{f.repo_id}/resolve/{quote(f.revision, safe='')}/{quote(f.filename)}"
