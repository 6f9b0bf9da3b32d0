"""`med3d list`, `info`, `download` and `cache`: the model zoo, its weights and the caches they fill."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from ..errors import EXIT_FAILED, EXIT_OK
from .options import UserError, add_command
from .output import PROG, say

# -- med3d list -------------------------------------------------------------------------------------


def add_list_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "list", common, help="models and pretrained weights, as a table",
                    description="List the models and their pretrained weights (from the weights manifest).",
                    epilog=f"examples:\n  {PROG} list\n  {PROG} list 'resnet5*'\n  {PROG} list --json")
    p.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'resnet1*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    from ..networks.registry import list_models
    from ..weights.manifest import load_entries

    pattern = args.pattern
    entries = [e for e in load_entries() if _matches(e.name, pattern) or _matches(e.model, pattern)]
    models = [m for m in list_models() if _matches(m, pattern) or any(e.model == m for e in entries)]
    if args.json:
        print(json.dumps({"models": models, "weights": [dict(e.cfg(), default=e.default) for e in entries]}, indent=2))
        return EXIT_OK
    if not models:
        raise UserError(f"no model or weights match {pattern!r}; try `{PROG} list` for all")
    rows = [("weights", "default", "size", "licence", "file", "description")]
    for model in models:
        mine = [e for e in entries if e.model == model]
        for e in mine:
            where = f"{e.hf_hub_id}/{e.filename}" if e.hf_hub_id else (e.urls[0] if e.urls else e.filename)
            rows.append((e.name, "*" if e.default else "", _size(e.size) if e.size else _estimated_size(e.model),
                         e.license, where, e.description))
        if not mine:
            rows.append((model, "", "", "", "(no pretrained weights: random init only)", ""))
    _print_table(rows)
    say(args, "", f"* = the weights `create_model(name, pretrained=True)` loads; details: {PROG} info NAME")
    return EXIT_OK


def _matches(name: str, pattern: str | None) -> bool:
    """fnmatch when the pattern has wildcards; else the name itself or its tags (resnet50 -> resnet50.*)."""
    import fnmatch

    if pattern is None:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def _size(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e6:.1f} MB"


def _estimated_size(arch: str) -> str:
    """A file's size where the manifest leaves it unknown, shown as about: the backbone's tensors in float32."""
    from ..weights.hub_model import build_model
    from ..weights.loader import build_without_init

    try:
        model = build_without_init(build_model, arch, num_classes=0)  # on the meta device: shapes only
    except Exception:  # an architecture this version cannot build: nothing to estimate
        return "?"
    return "~" + _size(sum(t.numel() * 4 for t in model.state_dict().values()))


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


# -- med3d info -------------------------------------------------------------------------------------


def add_info_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "info", common, help="parameters, source, licence, preprocessing, sha256 of a model or weights",
                    description="Describe a model and its weights: architecture, parameter count, file, checksum, "
                                "licence, training data and preprocessing. Never touches the network.",
                    epilog=f"examples:\n  {PROG} info resnet50            its default weights\n"
                           f"  {PROG} info resnet10.23datasets\n  {PROG} info resnet50 --json")
    p.add_argument("name", help="resnet50 (default weights) or resnet50.3dseg8")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from ..data.preprocess import transforms_for
    from ..networks.registry import split_name
    from ..weights.manifest import find_entry, load_entries

    arch, tag = split_name(args.name)
    entries = [e for e in load_entries() if e.model == arch]
    entry = None
    if tag is not None or any(e.default for e in entries):
        entry = find_entry(arch, tag)
    preprocess = transforms_for(entry.preprocess if entry else None)
    info = _describe(arch, entry, entries, preprocess)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join(_info_lines(arch, info, entry, preprocess)))
    return EXIT_OK


def _describe(arch: str, entry, entries, preprocess) -> dict[str, Any]:
    """What `med3d info` shows, as a dict (the --json output): the network, then the weights, if any."""
    from ..networks.resnet import ARCHITECTURES
    from ..weights.hub_model import build_model

    model = build_model(arch, num_classes=0)
    spec = ARCHITECTURES[arch]
    info: dict[str, Any] = {
        "name": entry.name if entry else arch,
        "architecture": arch,
        "block": spec["block"],
        "layers": list(spec["layers"]),
        "shortcut": entry.shortcut if entry else spec["shortcut"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding_dim": model.num_features,
        "feature_info": [dict(f) for f in model.feature_info],
        "other_weights": [e.name for e in entries if entry is None or e.name != entry.name],
    }
    if entry is not None:
        info.update(entry.cfg())
        info["default"] = entry.default
        info["description"] = entry.description
        info["manifest"] = entry.origin
        info["cached"] = _cached_path(entry.sha256)
    info["preprocess"] = preprocess.to_dict()
    return info


def _info_lines(arch: str, info: dict[str, Any], entry, preprocess) -> list[str]:
    """`med3d info` as text: one line per fact, the weights' provenance when the manifest has them."""
    from ..inference.features import describe_preprocess

    lines = [f"{info['name']}" + ("  (default weights of " + arch + ")" if entry is not None and entry.default else "")]
    add = lambda key, value: lines.append(f"  {key:<14} {value}")  # noqa: E731
    if entry is not None and entry.description:
        add("description", entry.description)
    add("architecture", f"{arch}: {info['block']} blocks {'-'.join(map(str, info['layers']))}, shortcut "
        f"{info['shortcut']}, dilated layer3/4 (output stride 8)")
    add("parameters", f"{info['parameters']:,} (backbone), embedding {info['embedding_dim']}-d")
    add("feature maps", ", ".join(f"{f['module']} {f['num_chs']} ch /{f['reduction']}" for f in info["feature_info"][1:]))
    if entry is None:
        add("weights", "none in the manifest: random init only")
    else:
        _weights_lines(add, entry, info["cached"])
    add("preprocessing", describe_preprocess(preprocess))
    if info["other_weights"]:
        add("other weights", ", ".join(info["other_weights"]))
    return lines


def _weights_lines(add, entry, cached: str | None) -> None:
    where = f"hf://{entry.hf_hub_id}@{entry.revision}/{entry.filename}" if entry.hf_hub_id else entry.filename
    add("file", f"{where} ({entry.size:,} bytes, {entry.format})" if entry.size else f"{where} ({entry.format})")
    for url in entry.urls:
        add("mirror", url)
    add("sha256", entry.sha256)
    add("licence", entry.license)
    source = entry.source
    if source.get("paper"):
        add("paper", source["paper"])
    for key, value in source.items():
        if key not in ("paper", "datasets"):
            add(key, value)
    if source.get("datasets"):
        add("trained on", "; ".join(source["datasets"]))
    add("manifest", entry.origin)
    add("cached", cached or f"no (fill the cache with `{PROG} download {entry.name}`)")


def _cached_path(sha256: str | None) -> str | None:
    """Where converted weights with this sha256 already lie, without any network call."""
    if not sha256:
        return None
    try:
        from ..weights.hub import cached_weights_path, settings

        path = cached_weights_path(sha256, settings())
        return str(path) if path.is_file() else None
    except Exception:  # the cache location is informative only
        return None


# -- med3d download ---------------------------------------------------------------------------------


def add_download_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "download", common, help="fetch and verify weights into the cache ahead of time",
                    description="Download weights, verify their sha256 and convert them into the cache, so that "
                                "later runs (e.g. on offline compute nodes sharing HF_HOME) need no network.",
                    epilog=f"examples:\n  {PROG} download resnet50.3dseg8\n  {PROG} download resnet10 resnet50\n"
                           f"  {PROG} download --all\n  HF_ENDPOINT=https://mirror.example {PROG} download resnet50")
    p.add_argument("names", nargs="*", help="weights names (resnet50 means its default weights)")
    p.add_argument("--all", action="store_true", help="every set of weights in the manifest")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    from ..networks.registry import split_name
    from ..weights.factory import create_model
    from ..weights.manifest import find_entry, load_entries

    if args.all:
        names = [e.name for e in load_entries()]
    elif args.names:
        names = [find_entry(*split_name(name)).name for name in args.names]
    else:
        raise UserError("name the weights to download (e.g. resnet50.3dseg8), or pass --all")
    for name in names:
        start = time.perf_counter()
        # Loading is downloading, verifying and converting into the cache; the model itself is
        # built on the meta device and costs next to nothing.
        model = create_model(name, pretrained=True, num_classes=0)
        cfg = model.pretrained_cfg or {}
        cached = _cached_path(cfg.get("sha256"))
        say(args, f"{name}: sha256 {cfg.get('sha256', '?')} verified; "
                  f"{'cached at ' + cached if cached else 'in the cache'} ({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


# -- med3d cache ------------------------------------------------------------------------------------


def add_cache_parser(sub, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, "cache", common, help="where the caches are, their sizes; clear or verify them",
                    description="The package keeps converted weights, mirror downloads and preprocessed training "
                                "data under one root: $MED3D_HUB_CACHE, else $HF_HOME/med3d_hub (HF_HOME defaults "
                                "to ~/.cache/huggingface). Hub downloads stay in huggingface_hub's cache; 'hub' "
                                "lists the repos the manifests name there. Everything here is rebuilt on demand.",
                    epilog=f"examples:\n  {PROG} cache                  sizes per kind\n"
                           f"  {PROG} cache clear train      remove the preprocessed training data\n"
                           f"  {PROG} cache clear            remove everything listed\n"
                           f"  {PROG} cache verify           re-hash every cached file, remove bad ones")
    p.add_argument("action", nargs="?", choices=("list", "clear", "verify"), default="list",
                   help="list (default), clear or verify")
    p.add_argument("kinds", nargs="*", metavar="KIND", help="clear: weights, downloads, train or hub (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    from ..weights import hub
    from ..weights.manifest import load_entries

    s = hub.settings()
    repos = sorted({e.hf_hub_id for e in load_entries() if e.hf_hub_id})
    if args.action != "clear" and args.kinds:
        raise UserError(f"{PROG} cache {args.action} takes no kind; kinds go with `{PROG} cache clear`")
    if args.action == "list":
        return _cache_list(args, hub, s, repos)
    if args.action == "clear":
        kinds = args.kinds or list(hub.cache_kinds(s, repos))
        try:
            removed = hub.clear_cache(s, kinds, repos)
        except ValueError as error:
            raise UserError(str(error)) from None
        for u in removed:
            say(args, f"{u.kind}: removed {u.files} file(s), {_bytes(u.bytes)}")
        return EXIT_OK
    return _cache_verify(args, hub, s, repos)


def _cache_list(args: argparse.Namespace, hub, s, repos: list[str]) -> int:
    usage = hub.cache_usage(s, repos)
    if args.json:
        print(json.dumps({"root": str(s.cache), "hub_cache": str(s.hub_cache), "kinds": [
            {"kind": u.kind, "paths": [str(p) for p in u.paths], "files": u.files, "bytes": u.bytes} for u in usage
        ]}, indent=2))
        return EXIT_OK
    print(f"cache root: {s.cache}  (set {hub.CACHE_ENV} to move it)")
    rows = [("kind", "files", "size", "where")]
    for u in usage:
        where = str(u.paths[0]) if len(u.paths) == 1 else f"{len(u.paths)} repos in {s.hub_cache}"
        rows.append((u.kind, str(u.files), _bytes(u.bytes), where))
    _print_table(rows)
    return EXIT_OK


def _cache_verify(args: argparse.Namespace, hub, s, repos: list[str]) -> int:
    report = hub.verify_cache(s, repos)
    bad = [(path, problem) for path, problem in report if problem]
    if args.json:
        print(json.dumps([{"file": str(p), "ok": q is None, "problem": q} for p, q in report], indent=2))
    else:
        for path, problem in bad:
            print(f"{PROG}: removed {path}: {problem}", file=sys.stderr)
        say(args, f"verified {len(report)} cached file(s) in {s.cache} and {s.hub_cache}: "
                  f"{len(report) - len(bad)} good, {len(bad)} bad (removed; they are fetched again when needed)")
    return EXIT_FAILED if bad else EXIT_OK


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
