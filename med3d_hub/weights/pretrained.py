"""Pretrained weights for ``create_model``.

The path of ``create_model("resnet50.3dseg8", pretrained=True)``: the manifest names the file, the hub
fetches and verifies it, the checkpoint code maps it, and it is loaded strictly into a model built
without a wasted random initialisation. Heads the weights do not have are initialised fresh (and
logged); ``in_chans != 1`` adapts the first conv (see ``checkpoints.adapt_in_chans``).

``pretrained`` may be True (the tag's weights, or the depth's default), a local file, or an
``hf://org/repo@revision/file`` reference. A ``.pth`` (downloaded or local) is converted once into
the cache root (``weights/<sha256>.safetensors``, see ``hub.cache_root``); every load checks that the
converted copy is the one of these source bytes. Weights in another float precision are converted
to float32; weights holding NaN or infinity are refused. Loader options, meaningful only with weights:
``cache_dir`` (huggingface_hub's cache), ``local_files_only`` and ``token``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MissingFileError, UsageError
from ..files import atomic_write
from ..networks.heads import SegmentationHead
from ..networks.resnet import init_weights
from . import checkpoints, hub
from .hub_model import build_model
from .manifest import WeightsEntry, find_entry, load_entries
from .model_files import check_finite
from .pretrained_cfg import PretrainedCfg

log = logging.getLogger(__name__)

__all__ = ["LOADER_ARGS", "create_pretrained"]

LOADER_ARGS = ("cache_dir", "local_files_only", "token")


@dataclass
class _Request:
    """What ``pretrained`` asks for: a manifest entry, a Hub file, or a local file."""

    label: str
    entry: WeightsEntry | None = None  # the manifest entry, when the name's tag (or True) picked one
    sources: list = field(default_factory=list)  # HubFile / URL, for remote weights
    ref: hub.HubFile | None = None  # an hf:// reference
    local: Path | None = None


def create_pretrained(arch: str, tag: str | None, pretrained: Any, **kwargs: Any) -> nn.Module:
    """Build ``arch`` and load the weights ``pretrained`` names; see the module docstring."""
    loader = {k: kwargs.pop(k) for k in LOADER_ARGS if k in kwargs}
    settings = hub.settings(**loader)
    request = _request(arch, tag, pretrained)
    loaded = _load_state_dict(request, settings)
    state_dict = _as_float32(loaded.state_dict, request.label)
    check_finite(state_dict, source=request.label)
    entry = request.entry or _entry_by_sha(arch, loaded.sha256)
    kwargs = _with_published_kwargs(entry, kwargs)

    shortcut = entry.shortcut if entry else checkpoints.infer_shortcut(state_dict)
    if kwargs.get("shortcut", shortcut) != shortcut:
        raise UsageError(
            f"the weights {entry.name if entry else request.label} were trained with shortcut {shortcut!r}, "
            f"but shortcut={kwargs['shortcut']!r} was passed; drop the shortcut argument, or use pretrained=False"
        )
    kwargs["shortcut"] = shortcut

    model = _build_without_init(arch, kwargs)
    head = _load_into(model, state_dict, source=request.label)
    model.pretrained_cfg = _cfg(arch, request, entry, loaded, model, head)
    return model


_HEAD_ARGS = ("num_classes", "seg_classes", "seg_upsample", "features_only")


def _with_published_kwargs(entry: WeightsEntry | None, kwargs: dict) -> dict:
    """The caller's arguments over the ones the weights were published with (``source.model_kwargs``).

    So a published fine-tuned model comes back with its own head and input channels by name alone.
    Any head argument of the caller (``num_classes=0`` for the encoder, another head,
    ``features_only``) replaces the published head as a whole.
    """
    published = dict((entry.source.get("model_kwargs") or {}) if entry else {})
    if any(k in kwargs for k in _HEAD_ARGS):
        published = {k: v for k, v in published.items() if k not in _HEAD_ARGS}
    return {**published, **kwargs}


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


def _as_float32(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Floating-point weights stored in another precision (float16, bfloat16, float64), as the float32 models use."""
    other = sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values() if v.is_floating_point() and v.dtype != torch.float32})
    if not other:
        return state_dict
    log.info("the weights of %s are stored as %s; converted to float32", source, ", ".join(other))
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


# -- building and loading -----------------------------------------------------------------------------

_RANDOM_INITS = {
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    nn.init.normal_,
    nn.init.uniform_,
    nn.init.kaiming_uniform_,
}


class _SkipRandomInitOnMeta(TorchFunctionMode):
    """Turn random initialisation of meta tensors into a no-op.

    On the meta device the values are never used, but PyTorch still routes ``normal_``/``uniform_``
    through a path that imports torch._dynamo (about a second, once per process).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_INITS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _build_without_init(arch: str, kwargs: dict) -> nn.Module:
    """The model on the meta device: no memory and no random init for tensors the weights replace."""
    with torch.device("meta"), _SkipRandomInitOnMeta():
        return build_model(arch, **kwargs)


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> str | None:
    """Load the weights strictly into the meta-built model; returns the head's state: "pretrained", "new" or None."""
    state_dict = dict(state_dict)
    conv1 = state_dict.get("conv1.weight")
    if conv1 is not None and conv1.shape[1] != model.in_chans:
        log.info("adapting conv1 of %s from %d to %d input channels", source, conv1.shape[1], model.in_chans)
        state_dict["conv1.weight"] = checkpoints.adapt_in_chans(conv1, model.in_chans)

    backbone, head = checkpoints.split_head(state_dict)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model_head = {k: v for k, v in shapes.items() if k.startswith(checkpoints.HEAD_PREFIXES)}
    checkpoints.check_backbone(
        {k: v for k, v in shapes.items() if k not in model_head}, backbone, source=source
    )

    head_state = None
    if model_head:
        fits = set(head) == set(model_head) and all(tuple(head[k].shape) == model_head[k] for k in head)
        if fits:
            backbone.update(head)
            head_state = "pretrained"
        else:
            head_state = "new"
            what = "carry no head" if not head else f"carry another head ({', '.join(sorted(head)[:4])}...)"
            log.info("the weights of %s %s: the model's head (%s) is freshly initialised", source, what, _head_name(model))
    elif head:
        log.info("the model has no head: %d head tensors of %s are not used", len(head), source)

    model.load_state_dict(backbone, strict=False, assign=True)
    if head_state == "new":
        _init_new_head(model)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: these tensors were neither loaded nor initialised: {', '.join(left)}")
    return head_state


def _head_name(model: nn.Module) -> str:
    if getattr(model, "seg_classes", None) is not None:
        return f"conv_seg, {model.seg_classes} classes"
    return f"fc, {model.num_classes} classes"


def _init_new_head(model: nn.Module) -> None:
    """A real, freshly initialised head, exactly as a randomly built model would have it."""
    if getattr(model, "seg_classes", None) is not None:
        head = SegmentationHead(model.num_features, model.seg_classes)
        init_weights(head)
        model.conv_seg = head
    if getattr(model, "num_classes", 0) > 0:
        model.reset_classifier(model.num_classes)


# -- provenance -----------------------------------------------------------------------------------------


def _cfg(arch: str, request: _Request, entry: WeightsEntry | None, loaded: _Loaded, model: nn.Module, head: str | None) -> dict:
    """``model.pretrained_cfg``: where the weights came from, what they are, and the preprocessing they expect."""
    if entry is not None:
        cfg = PretrainedCfg.from_entry(entry)
    else:
        from ..data.preprocess import PAPER_PREPROCESS

        cfg = PretrainedCfg(name=arch, architecture=arch, sha256=loaded.sha256, format=loaded.format,
                            preprocess=copy.deepcopy(PAPER_PREPROCESS), shortcut=model.shortcut)
    if request.ref is not None:
        cfg = replace(cfg, hf_hub_id=request.ref.repo_id, revision=request.ref.revision, filename=request.ref.filename, urls=[])
    if request.local is not None:
        cfg = replace(cfg, filename=request.local.name, urls=[], size=request.local.stat().st_size)
    conv1 = loaded.state_dict.get("conv1.weight")
    cfg = replace(
        cfg,
        file=str(request.local) if request.local is not None else None,
        weights_in_chans=int(conv1.shape[1]) if conv1 is not None else cfg.weights_in_chans,
        in_chans=model.in_chans,
        head=head,
        class_names=cfg.class_names if head == "pretrained" else None,  # a new head's classes have no names
    ).to_dict()
    return {**model.data_cfg((cfg.get("preprocess") or {}).get("size")), **cfg}
