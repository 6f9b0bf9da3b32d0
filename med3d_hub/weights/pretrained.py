"""Where the weights of ``create_model(name, pretrained=...)`` are, and reading them: ``resolve_weights``.

The path of ``create_model("resnet50.3dseg8", pretrained=True)``: the manifest names the file, the hub
fetches and verifies it, the checkpoint code maps it to zoo key names, and ``loader.load_model``
builds the model with it (heads, ``in_chans``, strict loading).

``pretrained`` may be True (the tag's weights, or the depth's default), a local file, or an
``hf://org/repo@revision/file`` reference. A ``.pth`` (downloaded or local) is converted once into
the cache root (``weights/<sha256>.safetensors``, see ``hub.cache_root``); every load checks that the
converted copy is the one of these source bytes. Loader options, meaningful only with weights:
``cache_dir`` (huggingface_hub's cache), ``local_files_only`` and ``token``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import MissingFileError
from ..files import atomic_write
from . import checkpoints, hub
from .loader import ResolvedWeights
from .manifest import WeightsEntry, find_entry, load_entries
from .pretrained_cfg import PretrainedCfg

log = logging.getLogger(__name__)

__all__ = ["LOADER_ARGS", "resolve_weights"]

LOADER_ARGS = ("cache_dir", "local_files_only", "token")


@dataclass
class _Request:
    """What ``pretrained`` asks for: a manifest entry, a Hub file, or a local file."""

    label: str
    entry: WeightsEntry | None = None  # the manifest entry, when the name's tag (or True) picked one
    sources: list = field(default_factory=list)  # HubFile / URL, for remote weights
    ref: hub.HubFile | None = None  # an hf:// reference
    local: Path | None = None


def resolve_weights(arch: str, tag: str | None, pretrained: Any, **loader: Any) -> ResolvedWeights:
    """Find, verify and read the weights ``pretrained`` names for ``arch``; ``loader``: ``LOADER_ARGS``."""
    settings = hub.settings(**loader)
    request = _request(arch, tag, pretrained)
    loaded = _load_state_dict(request, settings)
    entry = request.entry or _entry_by_sha(arch, loaded.sha256)
    published = dict((entry.source.get("model_kwargs") or {}) if entry else {})  # a published fine-tune's head
    label = entry.name if entry is not None and request.entry is not None else request.label
    return ResolvedWeights(loaded.state_dict, _cfg(arch, request, entry, loaded), label, published)


# -- what to load -------------------------------------------------------------------------------------


def _request(arch: str, tag: str | None, pretrained: Any) -> _Request:
    if pretrained is True:
        entry = find_entry(arch, tag)
        sources: list = [hub.HubFile(entry.hf_hub_id, entry.filename, entry.revision)] if entry.hf_hub_id else []
        return _Request(entry.name, entry, sources + list(entry.urls))
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"pretrained must be True/False, a file path or an 'hf://org/repo@revision/file' reference, "
            f"got {type(pretrained).__name__}"
        )
    entry = find_entry(arch, tag) if tag else None  # a tag with a file: the file must be those weights
    text = os.fspath(pretrained)
    if text.startswith("hf://"):
        ref = hub.parse_hf_reference(text)
        return _Request(str(ref), entry, [ref], ref=ref)
    path = Path(text).expanduser()
    if not path.is_file():
        tags = ", ".join(f"{e.name}" for e in load_entries() if e.model == arch)
        raise MissingFileError(
            f"pretrained={text!r} is neither an existing file nor an hf:// reference. Pass pretrained=True for "
            f"the default weights, a name with a tag ({tags or 'none known'}), a local .pth/.safetensors file, "
            "or hf://org/repo@revision/file"
        )
    return _Request(str(path), entry, local=path.resolve())


def _entry_by_sha(arch: str, sha256: str) -> WeightsEntry | None:
    """A manifest entry for exactly these bytes, so a local copy of released weights keeps its provenance."""
    return next((e for e in load_entries() if e.model == arch and e.sha256 == sha256), None)


# -- getting the state dict ---------------------------------------------------------------------------


class _Loaded(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    sha256: str  # of the file the weights came from
    format: str  # of that file
    source_sample: str | None = None  # hub.sample_digest of that file, as recorded in the converted copy


def _load_state_dict(request: _Request, s: hub.Settings) -> _Loaded:
    """The zoo-named state dict; converted files are cached by the sha256 of their source."""
    hub.clean_stale_temporaries(s, request.sources[0] if request.sources and isinstance(request.sources[0], hub.HubFile) else None)
    if request.local is not None:
        return _load_local(request, s)
    expected = request.entry.sha256 if request.entry else None
    if expected and (cached := _cached(expected, s)) is not None:
        return cached  # no network at all: the sha256 pins the content
    key = expected or hashlib.sha256(f"{s.endpoint}|{request.label}".encode()).hexdigest()
    with hub.weights_lock(key, s):
        if expected and (cached := _cached(expected, s)) is not None:
            return cached  # another process converted it while we waited
        fetched = hub.fetch(
            request.sources,
            s,
            expected_sha256=expected,
            label=request.label,
            skip_if=lambda sha: hub.cached_weights_path(sha, s).is_file(),
        )
        if (cached := _cached(fetched.sha256, s)) is not None:
            return cached
        if fetched.path is None:  # the cached copy vanished after the check: fetch the file itself
            fetched = hub.fetch(request.sources, s, expected_sha256=fetched.sha256, label=request.label)
        fmt = request.entry.format if request.entry else checkpoints.detect_format(fetched.path)
        return _convert(fetched.path, fmt, fetched.sha256, request.label, s)


_HASH_MEMO_MIN_AGE_S = 5.0


class _Identity(NamedTuple):
    sha256: str
    sample: str  # hub.sample_digest of the file now
    remembered: bool  # the sha256 came from the memo, not from hashing the file


def _local_identity(path: Path, s: hub.Settings) -> _Identity:
    """The sha256 of a local file, remembered per (path, size, inode, mtime, ctime): an unchanged file is hashed once.

    Hashing runs at about 1 GB/s, half a second for resnet200. Any write to the file sets its ctime,
    which no user call can set back, so a changed file is hashed again; a file changed within the
    last few seconds is not remembered, since timestamps can be that coarse. The memo is a speed-up,
    not a source of truth: it holds the sha256 with a sampled digest of the file (a few KiB read at
    fixed offsets), and the caller checks a remembered sha256 before it trusts it (see ``_load_local``).
    """
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode()).hexdigest()
    memo = s.cache / "hashes" / key
    sample = hub.sample_digest(path)
    try:
        known, _, known_sample = memo.read_text().strip().partition(" ")
        if hub.is_sha256(known) and known_sample == sample:
            return _Identity(known, sample, True)
    except OSError:
        pass
    sha256 = hub.sha256_file(path)
    if time.time() - max(st.st_mtime, st.st_ctime) > _HASH_MEMO_MIN_AGE_S:
        try:
            with atomic_write(memo, "w") as f:
                f.write(f"{sha256} {sample}")
        except OSError:  # a read-only cache: hash every time
            pass
    return _Identity(sha256, sample, False)


def _load_local(request: _Request, s: hub.Settings) -> _Loaded:
    """A local file's weights; a remembered sha256 is trusted only where it cannot make other weights pass.

    Where it names weights (a tag, or the sha256 of a manifest entry) the file is hashed in full. Where
    it only finds the converted copy, that copy's record of its source's sampled digest must match
    this file's; otherwise the file is hashed in full.
    """
    path = request.local
    sha256, sample, remembered = _local_identity(path, s)
    entry = request.entry
    if remembered and (entry is not None or any(e.sha256 == sha256 for e in load_entries())):
        sha256, remembered = hub.sha256_file(path), False
    if entry is not None and sha256 != entry.sha256:
        raise hub.ChecksumError(
            f"sha256 mismatch for {path}: expected {entry.sha256} ({entry.name}), got {sha256}. "
            f"The file is not the {entry.name} weights (it was left untouched); drop the tag to load it anyway."
        )
    fmt = checkpoints.detect_format(path)
    if fmt == "safetensors":  # already memory-mapped, nothing to convert
        return _Loaded(checkpoints.read_state_dict(path, fmt), sha256, fmt)
    cached = _cached(sha256, s)
    if cached is not None and remembered and cached.source_sample != sample:
        log.warning("the remembered sha256 of %s does not match its converted copy; hashing the file again", path)
        sha256 = hub.sha256_file(path)
        cached = _cached(sha256, s)
    if cached is not None:
        return cached
    with hub.weights_lock(sha256, s):
        if (cached := _cached(sha256, s)) is not None:
            return cached
        return _convert(path, fmt, sha256, str(path), s)


def _cached(sha256: str, s: hub.Settings) -> _Loaded | None:
    found = hub.load_cached_weights(sha256, s)
    if found is None:
        return None
    state_dict, metadata = found
    return _Loaded(state_dict, sha256, metadata.get("source_format", "medicalnet-pth"), metadata.get("source_sample"))


def _convert(path: Path, fmt: str, sha256: str, label: str, s: hub.Settings) -> _Loaded:
    """Read a verified file once and keep it as safetensors, so later loads never unpickle."""
    state_dict = checkpoints.read_state_dict(path, fmt)
    metadata = {"source_format": fmt, "source": hub.redact(label), "source_bytes": str(os.path.getsize(path)),
                "source_sample": hub.sample_digest(path),
                "architecture": checkpoints.architecture_of_keys(state_dict) or "unknown"}
    hub.store_weights(sha256, state_dict, s, metadata)
    return _Loaded(state_dict, sha256, fmt)


# -- provenance -----------------------------------------------------------------------------------------


def _cfg(arch: str, request: _Request, entry: WeightsEntry | None, loaded: _Loaded) -> PretrainedCfg:
    """Where the weights came from, what they are, and the preprocessing they expect."""
    if entry is not None:
        cfg = PretrainedCfg.from_entry(entry)
    else:
        from ..data.preprocess import PAPER_PREPROCESS

        cfg = PretrainedCfg(name=arch, architecture=arch, sha256=loaded.sha256, format=loaded.format,
                            preprocess=copy.deepcopy(PAPER_PREPROCESS))
    if request.ref is not None:
        cfg = replace(cfg, hf_hub_id=request.ref.repo_id, revision=request.ref.revision, filename=request.ref.filename, urls=[])
    if request.local is not None:
        cfg = replace(cfg, filename=request.local.name, urls=[], size=request.local.stat().st_size, file=str(request.local))
    return cfg
