"""The weights manifest: which files hold pretrained weights, where they live, and what they expect.

A manifest is a JSON file (schema: docs/manifest-schema.md). The one shipped with the package,
``weights_manifest.json``, lists the released MedicalNet files; organisations add their own with
``MED3D_HUB_MANIFEST=path1:path2`` (``os.pathsep``-separated, read at each call) or with
``add_manifest(path)``. Entries are keyed by ``model.tag``: a later manifest extends the list or
overrides an entry of the same name, and the last manifest that marks a default for a model sets it.

This module reads and validates manifests, and ``add_entry`` extends one atomically (a temporary
file renamed over the old one, so readers never see half a file); it never touches the network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import Med3DError, UsageError
from ..files import atomic_write
from ..networks.resnet import ARCHITECTURES
from .hub import check_hub_file
from .pretrained_cfg import PretrainedCfg

__all__ = [
    "ENV_VAR",
    "FORMATS",
    "EntryExistsError",
    "ManifestError",
    "WeightsEntry",
    "add_entry",
    "add_manifest",
    "default_entry",
    "find_entry",
    "list_pretrained",
    "load_entries",
    "manifest_paths",
    "manifest_with_entry",
    "read_manifest",
    "render_into",
    "shipped_entries",
    "weights_table_markdown",
    "write_manifest",
]

ENV_VAR = "MED3D_HUB_MANIFEST"
SCHEMA_VERSION = 1
FORMATS = ("medicalnet-pth", "safetensors")
SHIPPED_MANIFEST = Path(__file__).parents[1] / "weights_manifest.json"

_TAG = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_TOP_KEYS = {"schema_version", "description", "weights"}

# Manifests added in this process with add_manifest, in order.
_added: list[Path] = []


class ManifestError(Med3DError, ValueError):
    """A manifest file that cannot be read or does not follow the schema."""


class EntryExistsError(ManifestError):
    """The manifest already has an entry of that ``model.tag``, and replacing it was not asked for."""


@dataclass(frozen=True)
class WeightsEntry:
    """One set of pretrained weights, as a manifest entry describes it.

    ``source`` (paper, datasets, ...) and ``preprocess`` are plain dicts; ``cfg()`` is its ``PretrainedCfg``.
    """

    model: str
    tag: str
    sha256: str
    format: str
    shortcut: str
    license: str
    source: dict
    preprocess: dict
    filename: str
    hf_hub_id: str | None = None
    revision: str = "main"
    urls: tuple[str, ...] = ()
    size: int | None = None
    in_chans: int = 1
    default: bool = False
    description: str = ""
    origin: str = field(default="", compare=False)  # the manifest file the entry came from

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    def cfg(self) -> dict:
        """The entry as a `PretrainedCfg` dict (JSON-ready copies)."""
        return PretrainedCfg.from_entry(self).to_dict()


# -- reading and validation ----------------------------------------------------------------------

_REQUIRED = ("model", "tag", "filename", "sha256", "format", "shortcut", "license", "source", "preprocess")
_OPTIONAL = ("hf_hub_id", "revision", "urls", "size", "in_chans", "default", "description")


def _entry_from_dict(raw: Any, where: str, origin: str = "") -> WeightsEntry:
    """Validate one raw entry; every error names the entry (`where`) and the offending field."""

    def fail(message: str) -> ManifestError:
        return ManifestError(f"{where}: {message}")

    _check_fields(raw, fail)
    _check_identity(raw, fail)
    hf_hub_id, revision, urls = _check_locations(raw, fail)
    size, in_chans, default, description = _check_optional(raw, fail)
    _check_source(raw["source"], fail)
    try:
        preprocess = _check_preprocess(raw["preprocess"])
    except (TypeError, ValueError) as error:
        kind = "" if isinstance(error, ValueError) else "a value has the wrong type: "
        raise fail(f"preprocess: {kind}{error}") from None

    return WeightsEntry(
        model=raw["model"],
        tag=raw["tag"],
        sha256=raw["sha256"].lower(),
        format=raw["format"],
        shortcut=raw["shortcut"],
        license=raw["license"],
        source=json.loads(json.dumps(raw["source"])),
        preprocess=preprocess,
        filename=raw["filename"],
        hf_hub_id=hf_hub_id,
        revision=revision,
        urls=tuple(urls),
        size=size,
        in_chans=in_chans,
        default=default,
        description=description,
        origin=origin,
    )


_Fail = Callable[[str], ManifestError]


def _check_fields(raw: Any, fail: _Fail) -> None:
    """An object with every required field and no unknown one."""
    if not isinstance(raw, Mapping):
        raise fail(f"an entry must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in _REQUIRED if k not in raw]
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    if unknown:
        raise fail(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_REQUIRED + _OPTIONAL)}")


def _check_identity(raw: Mapping, fail: _Fail) -> None:
    """What the weights are: model, tag, file name, sha256, format, shortcut, licence."""
    model, tag = raw["model"], raw["tag"]
    if not isinstance(model, str) or model not in ARCHITECTURES:
        raise fail(f"model {model!r} is not one of {', '.join(ARCHITECTURES)}")
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise fail(f"tag {tag!r} must be lower-case letters, digits, '-' or '_' (no dots), e.g. '3dseg8'")
    filename = raw["filename"]
    if not isinstance(filename, str) or not filename or filename.startswith("/") or ".." in filename.split("/"):
        raise fail(f"filename {filename!r} must be a relative path inside the repo, e.g. 'resnet_50.pth'")
    sha256 = raw["sha256"]
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
        raise fail(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if not isinstance(raw["format"], str) or raw["format"] not in FORMATS:
        raise fail(f"format {raw['format']!r} is not one of {', '.join(FORMATS)}")
    if not isinstance(raw["shortcut"], str) or raw["shortcut"] not in ("A", "B"):
        raise fail(f"shortcut must be 'A' or 'B', got {raw['shortcut']!r}")
    if not isinstance(raw["license"], str) or not raw["license"]:
        raise fail("license must be a non-empty string such as 'MIT'")


def _check_locations(raw: Mapping, fail: _Fail) -> tuple[str | None, str, list[str]]:
    """Where the weights are: a Hub repo and revision, mirror URLs, or both."""
    hf_hub_id = raw.get("hf_hub_id")
    if hf_hub_id is not None and (not isinstance(hf_hub_id, str) or not _REPO_ID.fullmatch(hf_hub_id)):
        raise fail(f"hf_hub_id {hf_hub_id!r} must look like 'org/name'")
    revision = raw.get("revision", "main")
    if not isinstance(revision, str) or not revision:
        raise fail(f"revision must be a branch, tag or commit sha, got {revision!r}")
    urls = raw.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
        raise fail(f"urls must be a list of http(s) URLs, got {urls!r}")
    if hf_hub_id is None and not urls:
        raise fail("give hf_hub_id (a Hub repo) or urls (mirrors), or both: the entry has no source")
    if hf_hub_id is not None:
        try:  # they become paths in the Hugging Face cache: the Hub's own rules, before any download
            check_hub_file(hf_hub_id, revision, raw["filename"])
        except ValueError as error:
            raise fail(str(error)) from None
    return hf_hub_id, revision, urls


def _check_optional(raw: Mapping, fail: _Fail) -> tuple[int | None, int, bool, str]:
    """size, in_chans, default and description, with their defaults."""
    size = raw.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise fail(f"size must be a positive number of bytes or null (unknown), got {size!r}")
    in_chans = raw.get("in_chans", 1)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise fail(f"in_chans must be an integer >= 1, got {in_chans!r}")
    default = raw.get("default", False)
    if not isinstance(default, bool):
        raise fail(f"default must be true or false, got {default!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise fail(f"description must be a string, got {description!r}")
    return size, in_chans, default, description


def _check_source(source: Any, fail: _Fail) -> None:
    """Provenance: the paper, the datasets, and the create_model arguments of a published fine-tune."""
    if not isinstance(source, Mapping):
        raise fail("source must be an object with at least 'paper' and 'datasets'")
    if "paper" not in source or not (source["paper"] is None or isinstance(source["paper"], str)):
        raise fail("source.paper must be a citation string (or null)")
    datasets = source.get("datasets")
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise fail("source.datasets must be a list of strings")
    model_kwargs = source.get("model_kwargs")
    if model_kwargs is not None and not (
        isinstance(model_kwargs, Mapping) and all(isinstance(v, (str, int, float, bool, type(None))) for v in model_kwargs.values())
    ):
        raise fail(f"source.model_kwargs must be an object of create_model arguments (plain values), got {model_kwargs!r}")
    class_names = source.get("class_names")
    if class_names is not None and not (
        isinstance(class_names, list) and class_names and all(isinstance(n, str) and n for n in class_names)
    ):
        raise fail(f"source.class_names must be a list of the head's class names, got {class_names!r}")


def _check_preprocess(spec: Any) -> dict:
    """The canonical form of a preprocessing dict, validated by the preprocessing code itself."""
    from ..data.preprocess import Preprocess  # imported here: listing weights should not need it

    return Preprocess.from_dict(spec).to_dict()


def read_manifest(path: str | os.PathLike) -> list[WeightsEntry]:
    """Read and validate one manifest file; raises ManifestError naming the file and the entry."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise ManifestError(f"cannot read weights manifest {path}: {error.strerror or error}") from None
    return list(_read_cached(str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))


_cache: dict[tuple[str, int, int, int], tuple[WeightsEntry, ...]] = {}


def _read_cached(path: str, mtime_ns: int, size: int, inode: int = 0) -> tuple[WeightsEntry, ...]:
    # The inode changes with every atomic rewrite (write_manifest), even within one timestamp tick.
    key = (path, mtime_ns, size, inode)
    if key not in _cache:
        _cache[key] = tuple(_parse(Path(path)))
    return _cache[key]


def _parse(path: Path) -> list[WeightsEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read weights manifest {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ManifestError(
            f"{path} nests its JSON deeper than it can be read; a manifest is a flat list of entries "
            f'{{"schema_version": {SCHEMA_VERSION}, "weights": [...]}} (docs/manifest-schema.md)'
        ) from None
    return _entries_of(data, path)


def _entries_of(data: Any, path: Path) -> list[WeightsEntry]:
    """Validate a whole manifest document (``path`` names it in errors)."""
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise ManifestError(f'{path}: a manifest is a JSON object {{"schema_version": 1, "weights": [...]}}')
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ManifestError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")

    entries: list[WeightsEntry] = []
    seen: dict[str, int] = {}
    defaults: dict[str, str] = {}
    for i, raw in enumerate(data["weights"]):
        label = f"{raw.get('model')}.{raw.get('tag')}" if isinstance(raw, Mapping) else "?"
        entry = _entry_from_dict(raw, f"{path}, entry {i} ({label})", str(path))
        if entry.name in seen:
            raise ManifestError(f"{path}, entry {i} ({entry.name}): duplicate of entry {seen[entry.name]}")
        if entry.default and entry.model in defaults:
            raise ManifestError(
                f"{path}, entry {i} ({entry.name}): {defaults[entry.model]} is already the default for {entry.model}; "
                "mark one default per model"
            )
        seen[entry.name] = i
        if entry.default:
            defaults[entry.model] = entry.name
        entries.append(entry)
    return entries


# -- writing -------------------------------------------------------------------------------------------


def manifest_with_entry(path: str | os.PathLike, entry: Mapping[str, Any], *, replace: bool = False) -> dict:
    """The document of manifest ``path`` with ``entry`` added; the file itself is not touched.

    A missing file gives a new manifest holding only the entry. An existing file must be valid (a
    broken manifest is never rewritten). An entry of the same ``model.tag`` raises
    ``EntryExistsError`` unless ``replace`` is set; then it is replaced in place. A new default
    clears the earlier default of the same model in this file. The result is validated.
    """
    path = Path(path)
    if path.exists():
        read_manifest(path)  # the whole file is valid before anything is changed
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        data = {"schema_version": SCHEMA_VERSION, "weights": []}
    new = _entry_from_dict(entry, f"new entry for {path} ({entry.get('model')}.{entry.get('tag')})")
    weights = list(data["weights"])
    same = [i for i, raw in enumerate(weights) if raw.get("model") == new.model and raw.get("tag") == new.tag]
    if same and not replace:
        raise EntryExistsError(f"{path} already has {new.name} (entry {same[0]}); choose another tag, or replace it on purpose")
    if new.default:
        weights = [dict(raw, default=False) if raw.get("model") == new.model and raw.get("default") else raw for raw in weights]
    raw_entry = json.loads(json.dumps(dict(entry)))
    if same:
        weights[same[0]] = raw_entry
    else:
        weights.append(raw_entry)
    data = dict(data, weights=weights)
    _entries_of(data, path)
    return data


def write_manifest(path: str | os.PathLike, data: Mapping[str, Any]) -> list[WeightsEntry]:
    """Validate a manifest document and write it to ``path`` atomically; returns its entries.

    The text goes to a temporary file in the same folder, is flushed to disk, and is renamed over
    ``path``: a reader (or a crash) sees the old manifest or the new one, never a mix.
    """
    path = Path(path)
    _entries_of(data, path)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    with atomic_write(path, "w", fsync=True) as f:
        f.write(text)
    return read_manifest(path)


def add_entry(path: str | os.PathLike, entry: Mapping[str, Any], *, replace: bool = False) -> WeightsEntry:
    """Add ``entry`` to manifest ``path`` (created if missing), atomically; see ``manifest_with_entry``."""
    data = manifest_with_entry(path, entry, replace=replace)
    entries = write_manifest(path, data)
    return next(e for e in entries if e.model == entry["model"] and e.tag == entry["tag"])


# -- merging -----------------------------------------------------------------------------------------


def add_manifest(path: str | os.PathLike) -> list[WeightsEntry]:
    """Add a manifest for this process (after the shipped one and MED3D_HUB_MANIFEST's).

    Its entries extend the known weights or override entries of the same ``model.tag``. The file is
    validated now, and re-read when it changes. Returns its entries.
    """
    path = Path(path).expanduser().resolve()
    entries = read_manifest(path)
    if path not in _added:
        _added.append(path)
    return entries


def manifest_paths() -> list[Path]:
    """Manifests in the order they are merged: shipped, then MED3D_HUB_MANIFEST, then add_manifest."""
    from_env = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    return [SHIPPED_MANIFEST, *from_env, *_added]


def load_entries() -> list[WeightsEntry]:
    """All known weights after merging every manifest, in depth then tag order (defaults first)."""
    merged: dict[str, WeightsEntry] = {}
    for path in manifest_paths():
        if not path.is_file():
            if path == SHIPPED_MANIFEST:
                raise ManifestError(f"the shipped manifest {path} is missing: reinstall med3d-hub")
            how = "added with add_manifest" if path in _added else f"named in {ENV_VAR}"
            raise ManifestError(f"the weights manifest {path}, {how}, is not a file; fix the path or remove it")
        entries = read_manifest(path)
        new_defaults = {e.model for e in entries if e.default}
        for name, entry in list(merged.items()):  # a later default replaces an earlier one
            if entry.default and entry.model in new_defaults:
                merged[name] = replace(entry, default=False)
        for entry in entries:
            merged[entry.name] = entry
    return sorted(merged.values(), key=_order)


def _order(entry: WeightsEntry) -> tuple:
    """Depth, then the default first, then tags alphabetically."""
    return list(ARCHITECTURES).index(entry.model), not entry.default, entry.tag


# -- lookup ------------------------------------------------------------------------------------------


def list_pretrained(pattern: str | None = None) -> list[str]:
    """Every ``name.tag`` with pretrained weights; ``pattern`` is an fnmatch pattern such as ``"resnet5*"``."""
    names = [e.name for e in load_entries()]
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def find_entry(model: str, tag: str | None, entries: Iterable[WeightsEntry] | None = None) -> WeightsEntry:
    """The entry for ``model.tag``, or the model's default when ``tag`` is None; a helpful error otherwise."""
    entries = list(load_entries() if entries is None else entries)
    if tag is None:
        return default_entry(model, entries)
    for entry in entries:
        if entry.model == model and entry.tag == tag:
            return entry
    tags = [e.tag for e in entries if e.model == model]
    hint = f"weights for {model}: {', '.join(f'{model}.{t}' for t in tags)}" if tags else f"no weights are known for {model}"
    raise UsageError(
        f"no pretrained weights named {model}.{tag}; {hint}. "
        f"Add your own with {ENV_VAR} or med3d_hub.add_manifest(path)."
    )


def default_entry(model: str, entries: Iterable[WeightsEntry] | None = None) -> WeightsEntry:
    entries = list(load_entries() if entries is None else entries)
    for entry in entries:
        if entry.model == model and entry.default:
            return entry
    tags = [e.name for e in entries if e.model == model]
    if tags:
        raise UsageError(f"no default weights for {model}; name one of: {', '.join(tags)}")
    raise UsageError(f"no pretrained weights are known for {model}; see med3d_hub.list_pretrained()")


# -- documentation -----------------------------------------------------------------------------------


def weights_table_markdown(entries: Iterable[WeightsEntry] | None = None) -> str:
    """The table of docs/pretrained.md, generated from the manifest."""
    rows = [
        "| name | default | Hub repo | file | bytes | sha256 | licence | trained on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in load_entries() if entries is None else entries:
        size = f"{e.size:,}" if e.size else "unknown"
        datasets = ", ".join(d.split(" (")[0] for d in e.source.get("datasets", []))
        rows.append(
            f"| `{e.name}` | {'yes' if e.default else ''} | {e.hf_hub_id or ''} | {e.filename} | {size} | "
            f"`{e.sha256}` | {e.license} | {datasets} |"
        )
    return "\n".join(rows) + "\n"


TABLE_START = "<!-- weights-table:start (generated by: python docs/update_weights_table.py) -->"
TABLE_END = "<!-- weights-table:end -->"


def render_into(text: str, table: str) -> str:
    """``text`` with the block between the table markers replaced by ``table``."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise UsageError(f"the document has no table markers {TABLE_START!r} ... {TABLE_END!r}")
    return text[: start + len(TABLE_START)] + "\n" + table + text[end:]


def shipped_entries() -> list[WeightsEntry]:
    """The shipped manifest alone, so generated docs never depend on the caller's environment."""
    return sorted(read_manifest(SHIPPED_MANIFEST), key=_order)
