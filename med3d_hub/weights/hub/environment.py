"""The settings of one load, read from the environment at call time, and where the caches are.

The environment is handed to ``huggingface_hub`` as explicit arguments (``endpoint=``,
``cache_dir=``, ``local_files_only=``, ``token=``), because the client itself reads it only once, at import.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import UsageError

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV",
    "DEADLINE_ENV",
    "OLD_CACHE_ENV",
    "RETRIES_ENV",
    "Settings",
    "cache_root",
    "hub_repo_folder",
    "settings",
]


DEFAULT_TIMEOUT = 10.0  # seconds for one metadata request or one read of a download
DEFAULT_DEADLINE = 1800.0  # seconds for one whole download, resumptions included
DEFAULT_RETRIES = 3  # resumptions of a download after the connection was cut
CACHE_ENV = "MED3D_HUB_CACHE"
OLD_CACHE_ENV = "MED3D_CACHE"  # deprecated: it used to hold only the training cache, under its train/ folder
DEADLINE_ENV = "MED3D_HUB_DOWNLOAD_DEADLINE"
RETRIES_ENV = "MED3D_HUB_DOWNLOAD_RETRIES"
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class Settings:
    """Hub and cache settings, read from the environment at call time."""

    endpoint: str
    hub_cache: Path  # huggingface_hub's cache (HF_HUB_CACHE)
    cache: Path  # ours: converted weights, URL downloads, locks
    offline: bool
    token: str | bool | None
    timeout: float  # one metadata request, and connecting for a download (HF_HUB_ETAG_TIMEOUT)
    download_timeout: float  # the longest silence in the middle of a download (HF_HUB_DOWNLOAD_TIMEOUT)
    download_deadline: float  # one whole download, resumptions included (MED3D_HUB_DOWNLOAD_DEADLINE)
    download_retries: int  # resumptions after the connection was cut (MED3D_HUB_DOWNLOAD_RETRIES)


def _flag(*names: str) -> bool | None:
    values = [os.environ[n] for n in names if n in os.environ]
    return None if not values else any(v.strip().lower() in _TRUE for v in values)


def _seconds(name: str, default: float = DEFAULT_TIMEOUT) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UsageError(f"{name}={raw!r} must be a positive number of seconds")
    return value


_warned_old_env: list[bool] = []  # once per process


def cache_root(hf_home: Path | None = None) -> Path:
    """The one folder the package keeps things in: ``$MED3D_HUB_CACHE``, else ``$HF_HOME/med3d_hub``.

    ``MED3D_CACHE`` (the old training-cache variable) still works, with a deprecation warning (once).
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV]))
    if os.environ.get(OLD_CACHE_ENV):
        if not _warned_old_env:
            _warned_old_env.append(True)
            log.warning(
                "%s is deprecated: set %s instead (the one cache root; the training cache is its train/ folder)",
                OLD_CACHE_ENV,
                CACHE_ENV,
            )
        return Path(os.path.expanduser(os.environ[OLD_CACHE_ENV]))
    if hf_home is None:
        from huggingface_hub import constants

        hf_home = Path(os.path.expanduser(os.environ["HF_HOME"])) if os.environ.get("HF_HOME") else Path(constants.HF_HOME)
    return hf_home / "med3d_hub"


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    if not raw.strip().isdigit():
        raise UsageError(f"{name}={raw!r} must be a whole number >= 0")
    return int(raw)


def settings(
    *, cache_dir: str | os.PathLike | None = None, local_files_only: bool = False, token: str | bool | None = None
) -> Settings:
    """The settings of one load: explicit arguments first, then the environment, then huggingface_hub's defaults."""
    from huggingface_hub import constants

    offline = _flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    home = Path(os.path.expanduser(os.environ["HF_HOME"])) if os.environ.get("HF_HOME") else Path(constants.HF_HOME)
    hub_cache = (
        cache_dir
        or os.environ.get("HF_HUB_CACHE")
        or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or (home / "hub" if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE)
    )
    if token is None:
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    return Settings(
        endpoint=(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
        hub_cache=Path(os.path.expanduser(str(hub_cache))),
        cache=cache_root(home),
        offline=bool(local_files_only or (constants.HF_HUB_OFFLINE if offline is None else offline)),
        token=token,
        timeout=_seconds("HF_HUB_ETAG_TIMEOUT"),
        download_timeout=_seconds("HF_HUB_DOWNLOAD_TIMEOUT"),
        download_deadline=_seconds(DEADLINE_ENV, DEFAULT_DEADLINE),
        download_retries=_count(RETRIES_ENV, DEFAULT_RETRIES),
    )


def hub_repo_folder(s: Settings, repo_id: str) -> Path:
    """The folder of a model repo in the Hugging Face cache."""
    return s.hub_cache / f"models--{repo_id.replace('/', '--')}"
