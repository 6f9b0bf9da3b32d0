"""Every byte that crosses the network, and the caches those bytes land in.

- Hub files go through ``huggingface_hub`` (its cache, ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE``,
  ``local_files_only``, tokens, revisions and file locks). Mirrors outside the Hub (plain URLs in a
  manifest) go through ``requests``: streamed, with timeouts, to a temporary file renamed into place.
- Every file is checked against its sha256 before anything reads it. A mismatch removes the bad bytes
  from the Hugging Face cache (blob and snapshot links) and from ours, then raises ``ChecksumError``.
- One cache root holds everything the package keeps: ``$MED3D_HUB_CACHE``, else ``$HF_HOME/med3d_hub``
  (``cache_root``). Converted weights are ``weights/<sha256>.safetensors`` there, written atomically,
  read by memory map, and each names its source in its metadata (checked at every load, see
  ``load_cached_weights``); mirror downloads go to ``downloads/``, training data to ``train/``.
- Repo ids, revisions and filenames are checked against the Hub's rules before any of them reaches
  the client (``check_hub_file``): they become paths in the caches.
- Tokens never reach a message: ``redact`` removes them from everything the package prints or logs.
- The environment is read at each call and handed to ``huggingface_hub`` as explicit arguments
  (``endpoint=``, ``cache_dir=``, ``local_files_only=``, ``token=``), because the client itself reads
  it only once, at import.

Reaching a Hub is bounded: before ``hf_hub_download`` (whose own retries can take minutes on a dead
or silent server) one metadata request is made with a single timeout (``HF_HUB_ETAG_TIMEOUT``,
default 10 s) and no retries. If it fails, the cached copy is used when there is one; otherwise the
error says what was tried and the ways out.

The modules, each owning one thing: ``names`` (Hub names checked before they become paths),
``environment`` (the settings of one load, the cache root), ``errors`` (failures as the package's
errors, redaction), ``transport`` (bounded HTTP requests and downloads), ``cache`` (our converted
weights, their upkeep, locks) and ``fetching`` (one file from the Hub or a mirror, verified). This
namespace is the interface the rest of the package uses.
"""

from ...files import sha256_file
from .cache import (
    CACHE_FORMAT,
    CACHE_KINDS,
    CacheUse,
    cache_kinds,
    cache_usage,
    cached_weights_path,
    clean_stale_temporaries,
    clear_cache,
    is_sha256,
    load_cached_weights,
    sample_digest,
    store_weights,
    verify_cache,
    weights_lock,
)
from .environment import CACHE_ENV, OLD_CACHE_ENV, Settings, cache_root, hub_repo_folder, settings
from .errors import ChecksumError, HubUnreachableError, WeightsDownloadError, redact, transport_errors
from .fetching import Fetched, fetch
from .names import HubFile, check_hub_file, parse_hf_reference, resolve_url

__all__ = [
    "CACHE_ENV",
    "CACHE_FORMAT",
    "CACHE_KINDS",
    "OLD_CACHE_ENV",
    "CacheUse",
    "ChecksumError",
    "Fetched",
    "HubFile",
    "HubUnreachableError",
    "Settings",
    "WeightsDownloadError",
    "cache_kinds",
    "cache_root",
    "cache_usage",
    "cached_weights_path",
    "check_hub_file",
    "clean_stale_temporaries",
    "clear_cache",
    "fetch",
    "hub_repo_folder",
    "is_sha256",
    "load_cached_weights",
    "parse_hf_reference",
    "redact",
    "resolve_url",
    "sample_digest",
    "settings",
    "sha256_file",
    "store_weights",
    "transport_errors",
    "verify_cache",
    "weights_lock",
]
