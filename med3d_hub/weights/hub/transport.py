"""Bounded HTTP: one metadata request and one streamed download, each ending whatever the server does.

Through ``requests`` (a declared dependency), the same on every huggingface_hub generation: ``probe``
makes one HEAD request with a single timeout and no retries (``hf_hub_download``'s own retries can
take minutes on a dead or silent server); ``download`` streams to disk with limits on silence,
resumptions and total time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urljoin, urlsplit

from .environment import DEADLINE_ENV, RETRIES_ENV, Settings
from .errors import HubUnreachableError, Refused, WeightsDownloadError, reason

log = logging.getLogger(__name__)

__all__ = ["Remote", "download", "probe"]


_READ = 1 << 20  # at most this many bytes per read of a download: memory stays flat


@dataclass(frozen=True)
class Remote:
    """What a Hub says about a file before sending it (the headers huggingface_hub reads too)."""

    commit_hash: str | None
    etag: str | None
    size: int | None


def probe(url: str, s: Settings) -> Remote:
    """One HEAD request, without retries: ``HF_HUB_ETAG_TIMEOUT`` bounds it on every huggingface_hub version.

    Redirects within the Hub are followed; one to another host (a CDN) is not: the Hub's answer already
    carries the file's commit, ETag and size. Raises ``Refused`` for an error status and
    ``HubUnreachableError`` when no answer came.
    """
    import requests
    from huggingface_hub.utils import build_hf_headers

    headers = {**build_hf_headers(token=s.token), "Accept-Encoding": "identity"}
    for _ in range(5):
        try:
            response = requests.head(url, headers=headers, allow_redirects=False, timeout=s.timeout)
        except requests.RequestException as error:
            raise HubUnreachableError(reason(error)) from None
        location = response.headers.get("Location", "")
        if 300 <= response.status_code < 400 and location and not urlsplit(location).netloc:
            url = urljoin(url, location)
            continue
        break
    if response.status_code >= 400:
        raise Refused(response.status_code, response.headers.get("X-Error-Code"))
    h = response.headers
    etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").removeprefix("W/").strip('"') or None
    size = h.get("X-Linked-Size") or h.get("Content-Length")
    return Remote(h.get("X-Repo-Commit"), etag, int(size) if size and size.isdigit() else None)


class _Cut(Exception):
    """The server ended a response before the whole file arrived."""


def download(url: str, dest: Path, s: Settings, *, headers: Mapping[str, str] | None = None, size: int | None = None) -> str:
    """GET ``url`` into ``dest`` (created or truncated) and return the sha256 of its bytes.

    Streamed to disk a read at a time, so memory stays flat. Every download ends, whatever the server
    does: ``HF_HUB_DOWNLOAD_TIMEOUT`` of silence ends it (a stalled server is not asked again), a cut
    connection is resumed with a Range request (from the start when the server ignores Range) at most
    ``MED3D_HUB_DOWNLOAD_RETRIES`` times, and ``MED3D_HUB_DOWNLOAD_DEADLINE`` bounds the whole.
    """
    import requests
    import urllib3

    started = time.monotonic()
    deadline = started + s.download_deadline
    base = {**(headers or {}), "Accept-Encoding": "identity"}
    digest, done, cuts, answered = hashlib.sha256(), 0, 0, False

    def stopped(what: str) -> HubUnreachableError:
        got = f"{done} of {size} bytes" if size else f"{done} bytes"
        return HubUnreachableError(
            f"the download of {url} was stopped: {what} ({got}, {cuts} cut(s), {time.monotonic() - started:.1f} s). "
            f"Limits: {s.download_timeout:g} s of silence (HF_HUB_DOWNLOAD_TIMEOUT), {s.download_retries} "
            f"resumption(s) after a cut ({RETRIES_ENV}), {s.download_deadline:g} s in all ({DEADLINE_ENV}); "
            "raise them for a slow link. Nothing was kept."
        )

    bar = _progress_bar(url, size)
    with open(dest, "wb") as out, bar:
        while True:
            request_headers = {**base, "Range": f"bytes={done}-"} if done else base
            try:
                with requests.get(
                    url, headers=request_headers, stream=True, timeout=(s.timeout, s.download_timeout)
                ) as response:
                    answered = True
                    if response.status_code >= 500:
                        raise _Cut(f"HTTP {response.status_code}")
                    if response.status_code >= 400:
                        raise WeightsDownloadError(f"cannot download {url}: the server answered HTTP {response.status_code}")
                    if done and response.status_code != 206:  # Range ignored: the whole file comes again
                        out.seek(0)
                        out.truncate()
                        digest, done = hashlib.sha256(), 0
                        bar.reset(total=size)
                    if size is None and response.status_code == 200 and response.headers.get("Content-Length", "").isdigit():
                        size = int(response.headers["Content-Length"])
                        bar.reset(total=size)
                    read = getattr(response.raw, "read1", response.raw.read)
                    while chunk := read(_READ):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
                        if time.monotonic() > deadline:
                            raise stopped(f"the deadline of {s.download_deadline:g} s passed")
                if size is None or done == size:
                    return digest.hexdigest()
                if done > size:
                    raise WeightsDownloadError(f"cannot download {url}: the server sent more than the {size} bytes it announced")
                raise _Cut("the server closed the connection early")
            except (requests.Timeout, urllib3.exceptions.TimeoutError) as error:
                raise stopped(f"the server went silent ({type(error).__name__})") from None
            except (_Cut, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
                if isinstance(error, HubUnreachableError | WeightsDownloadError):
                    raise
                if not answered:
                    raise HubUnreachableError(
                        f"could not reach {url} (timeout {s.timeout:g} s): {reason(error)}."
                    ) from None
                cuts += 1
                if cuts > s.download_retries:
                    raise stopped(f"the connection was cut too often, last: {reason(error)}") from None
                if time.monotonic() > deadline:
                    raise stopped(f"the deadline of {s.download_deadline:g} s passed") from None
                log.warning("the download of %s was cut after %d bytes (%s); resuming", url, done, reason(error))


def _progress_bar(url: str, size: int | None):
    """huggingface_hub's own progress bar, named after the file: shown on stderr unless bars are off
    (``HF_HUB_DISABLE_PROGRESS_BARS``, ``huggingface_hub.utils.disable_progress_bars``, ``med3d -q``)."""
    from huggingface_hub.utils import tqdm

    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or url
    return tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=True)
