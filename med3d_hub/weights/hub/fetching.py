"""Getting one weights file: from the Hub into huggingface_hub's cache, or from a mirror URL into ours, verified.

Every file is checked against its sha256 before anything reads it; a mismatch removes the bad bytes
from the Hugging Face cache (blob and snapshot links) and from ours, then raises ``ChecksumError``.
When the Hub cannot be reached, the cached copy is used if there is one; otherwise the error says
what was tried and the ways out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

from ...errors import UsageError
from ...files import atomic_write, sha256_file
from .cache import cached_weights_path, is_sha256
from .environment import Settings
from .errors import ChecksumError, HubUnreachableError, Refused, WeightsDownloadError, mismatch, not_served, redact, ways_out
from .names import HubFile, resolve_url
from .transport import Remote, download, probe

log = logging.getLogger(__name__)

__all__ = ["Fetched", "fetch"]


@dataclass(frozen=True)
class Fetched:
    """A verified local file (``path``), or only its sha256 when ``skip_if`` said it is already converted."""

    path: Path | None
    sha256: str
    where: str  # the URL or cache path it came from


def fetch(
    sources: Sequence[HubFile | str],
    s: Settings,
    *,
    expected_sha256: str | None,
    label: str,
    skip_if: Callable[[str], bool] | None = None,
) -> Fetched:
    """Get one weights file from the first source that delivers it, verified against ``expected_sha256``.

    ``sources`` are Hub files and mirror URLs, tried in order. Without ``expected_sha256`` (a Hub file
    outside any manifest) the file is checked against the sha256 the Hub reports for it. ``skip_if(sha)``
    lets the caller stop before a download whose result it already holds. ``label`` names the
    weights in messages.
    """
    if not sources:
        raise UsageError(f"{label}: no source to download from")
    failures: list[tuple[str, OSError]] = []
    for source in sources:
        try:
            if isinstance(source, HubFile):
                return _fetch_hub(source, s, expected_sha256, skip_if)
            if expected_sha256 is None:
                raise UsageError(f"{label}: a URL source needs a sha256 to check the download against")
            return _fetch_url(source, s, expected_sha256)
        except (HubUnreachableError, ChecksumError, WeightsDownloadError) as error:
            error.args = (redact(error),)  # a server may echo the Authorization header in its answer
            failures.append((redact(source), error))
            if len(sources) > 1:
                log.warning("could not get %s from %s: %s", label, redact(source), error)
    errors = [e for _, e in failures]
    first = sources[0]
    example = os.path.basename(first.filename if isinstance(first, HubFile) else urlsplit(first).path)
    hint = f" {ways_out(s, example)}" if any(isinstance(e, HubUnreachableError) for e in errors) else ""
    if len(failures) == 1:
        if not hint:
            raise errors[0]
        raise HubUnreachableError(f"{errors[0]}{hint}") from None
    tried = "\n".join(f"  - {where}: {error}" for where, error in failures)
    kind = (
        ChecksumError
        if any(isinstance(e, ChecksumError) for e in errors)
        else HubUnreachableError
        if all(isinstance(e, HubUnreachableError) for e in errors)
        else WeightsDownloadError
    )
    raise kind(f"could not get {label} from any of its {len(failures)} sources:\n{tried}\n{hint.strip()}".rstrip())


def _fetch_hub(f: HubFile, s: Settings, expected: str | None, skip_if: Callable[[str], bool] | None) -> Fetched:
    url = resolve_url(f, s.endpoint)
    if s.offline:
        path = _from_hf_cache(f, s)
        if path is not None:
            return _verify_hf(path, f, s, expected, where=str(path))
        known = expected or _converted_sha256(f, s)
        if known and skip_if is not None and skip_if(known):
            return Fetched(None, known, str(cached_weights_path(known, s)))
        raise HubUnreachableError(
            f"{f} is not in the Hugging Face cache {s.hub_cache}, and offline mode is on "
            "(HF_HUB_OFFLINE or local_files_only), so it was not downloaded from "
            f"{url}."
        )

    # One bounded request tells whether the server is there, and what it holds.
    try:
        meta = probe(url, s)
    except Refused as refused:
        if refused.status >= 500:
            return _unreachable(f, s, url, f"HTTP {refused.status}", expected)
        raise not_served(f, url, refused) from None
    except HubUnreachableError as error:
        return _unreachable(f, s, url, str(error), expected)
    if meta.commit_hash is None:
        reason = "an answer without the X-Repo-Commit header: this server does not speak the Hub protocol"
        return _unreachable(f, s, url, reason, expected)

    remote = meta.etag if meta.etag and is_sha256(meta.etag) else None
    if expected and remote and remote != expected:
        raise mismatch(
            f"{f.filename} at {url}",
            expected,
            remote,
            (),
            "The server reports other content than the manifest pins (changed upstream, or a wrong mirror); "
            "nothing was downloaded.",
        )
    want = expected or remote
    if want and skip_if is not None and skip_if(want):
        _remember_converted(f, want, s)
        return Fetched(None, want, url)
    fetched = _hf_download(f, s, url, meta, want)
    _remember_converted(f, fetched.sha256, s)
    return fetched


def _hub_file_key(f: HubFile) -> str:
    return hashlib.sha256(f"{f.repo_id}|{f.revision}|{f.filename}".encode()).hexdigest()


def _remember_converted(f: HubFile, sha256: str, s: Settings) -> None:
    """Note which bytes a Hub file held, so offline mode finds their converted copy without the original."""
    memo = s.cache / "hub-files" / _hub_file_key(f)
    try:
        with atomic_write(memo, "w") as handle:
            handle.write(sha256)
    except OSError:  # a read-only cache: offline loads then need the Hugging Face cache
        pass


def _converted_sha256(f: HubFile, s: Settings) -> str | None:
    try:
        known = (s.cache / "hub-files" / _hub_file_key(f)).read_text().strip()
    except OSError:
        return None
    return known if is_sha256(known) else None


_CACHE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]*")


def _hf_download(f: HubFile, s: Settings, url: str, meta: Remote, want: str | None) -> Fetched:
    """Download a Hub file into huggingface_hub's cache layout, checked before it enters the cache.

    The layout is the client's documented one (``models--org--name/blobs/<etag>``, a
    ``snapshots/<commit>/<file>`` link to it, ``refs/<branch>``), so its offline mode, ``scan_cache_dir``
    and ``hf cache`` see the file. The bytes travel through ``download``, which bounds the transfer the
    same way whatever huggingface_hub generation is installed.
    """
    from huggingface_hub.utils import build_hf_headers

    etag, commit = meta.etag or "", meta.commit_hash or ""
    if not _CACHE_NAME.fullmatch(etag) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise WeightsDownloadError(
            f"cannot download {url}: the server's answer names no usable ETag ({etag!r}) or commit ({commit!r})"
        )
    repo_dir = s.hub_cache / ("models--" + f.repo_id.replace("/", "--"))
    blob = repo_dir / "blobs" / etag
    pointer = _inside(repo_dir / "snapshots" / commit, f.filename, url)
    if blob.is_file():
        _link(pointer, blob)
        return _verify_hf(str(pointer), f, s, want, where=url)
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp = blob.with_name(f"{blob.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        actual = download(url, tmp, s, headers=build_hf_headers(token=s.token), size=meta.size)
        if want is not None and actual != want:
            raise mismatch(
                f"{f.filename} ({f}, from {url})",
                want,
                actual,
                (),
                "The download was corrupted or the server holds other bytes than it reports; retry, or check the mirror.",
            )
        os.replace(tmp, blob)
    finally:
        tmp.unlink(missing_ok=True)
    _link(pointer, blob)
    if f.revision != commit:
        ref = _inside(repo_dir / "refs", f.revision, url)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    if want is None:
        log.warning("the Hub reported no sha256 for %s; it is loaded without a content check", f)
    return Fetched(pointer, actual, url)


def _inside(folder: Path, relative: str, url: str) -> Path:
    """``folder / relative``, refused when it would land outside ``folder``."""
    path = folder / relative
    if relative.startswith("/") or ".." in Path(relative).parts or not os.path.abspath(path).startswith(
        os.path.abspath(folder) + os.sep
    ):
        raise WeightsDownloadError(f"cannot download {url}: {relative!r} would be written outside {folder}")
    return path


def _link(pointer: Path, blob: Path) -> None:
    """Point a snapshot entry at its blob: a relative link, or a copy where links are not allowed."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
        os.replace(tmp, pointer)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def _unreachable(f: HubFile, s: Settings, url: str, reason: str, expected: str | None) -> Fetched:
    """The server is not there: use the cached copy if there is one, else explain."""
    path = _from_hf_cache(f, s)
    if path is not None:
        log.warning("could not reach %s (%s); using the cached copy of %s", s.endpoint, reason, f)
        return _verify_hf(path, f, s, expected, where=str(path))
    raise HubUnreachableError(
        f"could not reach the Hub at {s.endpoint} for {f}: tried HEAD {url} (timeout {s.timeout:g} s, "
        f"no retries) and got {reason}; the file is not in the cache {s.hub_cache}."
    ) from None


def _from_hf_cache(f: HubFile, s: Settings) -> str | None:
    """The cached copy of a Hub file at its revision, without any network call; None if there is none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return hf_hub_download(f.repo_id, f.filename, revision=f.revision, cache_dir=s.hub_cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError):
        return None


def _verify_hf(path: str, f: HubFile, s: Settings, expected: str | None, *, where: str) -> Fetched:
    """Check a file in the Hugging Face cache; remove it (blob and snapshot links) if it is wrong."""
    blob = Path(os.path.realpath(path))
    if expected is None and is_sha256(blob.name):
        expected = blob.name  # the cache names LFS blobs after the sha256 the Hub reported at download time
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        removed = _purge_hf_file(Path(path), s)
        raise mismatch(
            f"{f.filename} ({f}, from {where})",
            expected,
            actual,
            removed,
            "The download was corrupted or the server holds other bytes than it reports; retry, or check the mirror.",
        )
    if expected is None:
        log.warning("the Hub reported no sha256 for %s; it is loaded without a content check", f)
    return Fetched(Path(path), actual, where)


def _purge_hf_file(pointer: Path, s: Settings) -> list[Path]:
    """Remove a bad file from the Hugging Face cache: its blob and every snapshot entry pointing to it."""
    blob = os.path.realpath(pointer)
    removed: list[Path] = []
    repo_dir = next((p.parent for p in pointer.parents if p.name == "snapshots"), None)
    if repo_dir is not None:
        for root, _dirs, files in os.walk(repo_dir / "snapshots"):
            for name in files:
                entry = Path(root) / name
                if entry.is_symlink() and os.path.realpath(entry) == blob:
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
    for leftover in (pointer, Path(blob)):
        if leftover.exists() or leftover.is_symlink():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _fetch_url(url: str, s: Settings, expected: str) -> Fetched:
    """A manifest mirror outside the Hub: downloaded by ``download``, renamed into place once verified."""
    name = os.path.basename(urlsplit(url).path) or "weights"
    final = s.cache / "downloads" / expected / name
    if final.is_file():
        actual = sha256_file(final)
        if actual == expected:
            return Fetched(final, actual, str(final))
        final.unlink()
        raise mismatch(f"{name} (cached from {url})", expected, actual, [final], "The cached copy was damaged; retry.")
    if s.offline:
        raise HubUnreachableError(f"{url} is not in the cache {final.parent}, and offline mode is on.")

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        actual = download(url, tmp, s)
        if actual != expected:
            raise mismatch(f"{name} from {url}", expected, actual, (), "The mirror serves other bytes; check it.")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return Fetched(final, actual, url)
