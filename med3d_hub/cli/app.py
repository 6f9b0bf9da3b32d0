"""The ``med3d`` command: list, inspect and download weights; extract features; run the demo;
export and publish trained weights.

Thin by design: each subcommand parses its options and calls the package's modules. Exit codes:

    0   success
    1   some inputs failed (reported and skipped; the others were written)
    2   usage or user error (bad option, unknown model, unreadable manifest, existing tag, NaN weights, ...)
    3   the Hub or mirror is unreachable (weights: and nothing is cached; publish: nothing was sent)
    4   publish: the upload or its round-trip check failed (the manifest was not changed)
    70  internal error (a bug: rerun with --debug and report the traceback)
    130 interrupted

User errors print one line, ``med3d: error: ...``, and no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..errors import (
    EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_PUBLISH_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, Med3DError,
    exit_code,
)
from ..weights.pretrained_cfg import has_weights

EXIT_FAILED_INPUTS = EXIT_FAILED  # some inputs failed; the others were written
PROG = "med3d"


class UserError(Med3DError):
    """An error in the command's arguments; printed as one line without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = code


# -- output helpers ---------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    from ..weights.hub import redact

    return "; ".join(part.strip() for part in redact(message).splitlines() if part.strip())


def _say(args: argparse.Namespace, *lines: str) -> None:
    """Informational output (stdout); --quiet silences it."""
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line, flush=True)


def _warn(message: str) -> None:
    from ..weights.hub import redact

    print(f"{PROG}: warning: {redact(message)}", file=sys.stderr, flush=True)


# -- shared options ---------------------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    """--quiet/--debug, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print only errors and warnings (no progress bar, no summary)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    return common


def _model_options(default_model: str) -> argparse.ArgumentParser:
    group = argparse.ArgumentParser(add_help=False)
    g = group.add_argument_group("model and weights")
    g.add_argument("--model", "-m", default=default_model,
                   help=f"model name, optionally with a weights tag: resnet50, resnet50.3dseg8 (default {default_model})")
    g.add_argument("--pretrained", "-p", metavar="WEIGHTS", default=None,
                   help="the model's default weights when left out; a tag (3dseg8, 23datasets), a local MedicalNet "
                        ".pth or .safetensors file, hf://org/repo@rev/file, or 'none' for random weights")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the random init with --pretrained none: the same seed gives the same weights "
                        "and features; fid also seeds its KID subsets and bootstrap with it (default 0)")
    return group


def _preprocess_options() -> argparse.ArgumentParser:
    group = argparse.ArgumentParser(add_help=False)
    g = group.add_argument_group(
        "preprocessing overrides",
        "By default the preprocessing stored with the weights is used (see `med3d info MODEL`); "
        "each option replaces one step.",
    )
    g.add_argument("--spacing", nargs="+", metavar="MM",
                   help="resample to this voxel spacing in mm: one value (isotropic) or D H W; 'none' keeps the input's")
    g.add_argument("--size", nargs="+", metavar="N",
                   help="network input size: one value (cube) or D H W; 'none' keeps the preprocessed size")
    g.add_argument("--size-mode", choices=("resize", "crop_pad"),
                   help="reach --size by trilinear resizing or by centre crop / zero pad")
    g.add_argument("--intensity", metavar="SPEC",
                   help="percentile_zscore[:LOW,HIGH] | nonzero_zscore | hu_window:MIN,MAX | none")
    g.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction, default=None,
                   help="crop to the bounding box of non-zero voxels before normalising")
    return group


def _runtime_options() -> argparse.ArgumentParser:
    group = argparse.ArgumentParser(add_help=False)
    g = group.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    g.add_argument("--amp", choices=("bf16", "fp16"),
                   help="autocast the forward; refused on a CPU without native support (it is hundreds of times slower there)")
    g.add_argument("--force-amp", action="store_true", help="use --amp even where it is emulated and slow")
    g.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    return group


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _triple(values: list[str] | None, option: str, kind: type) -> Any:
    """CLI numbers -> ... (not given), None ('none': the step is switched off), (v, v, v) from one value, or D H W."""
    if values is None:
        return ...
    if len(values) == 1 and values[0].lower() in ("none", "null", "keep"):
        return None
    try:
        numbers = [kind(v) for v in values]
    except ValueError:
        raise UserError(
            f"{option} takes numbers, got {' '.join(values)} (give the scan paths before options "
            "that take several values, or after --)"
        ) from None
    if len(values) not in (1, 3):
        raise UserError(f"{option} takes one value or three (D H W), got {len(values)}: {' '.join(values)}")
    return tuple(numbers * 3 if len(numbers) == 1 else numbers)


def parse_intensity(spec: str) -> dict:
    """``hu_window:-200,250`` -> ``{"method": "hu_window", "min": -200.0, "max": 250.0}``."""
    method, _, params = spec.partition(":")
    method = method.strip().replace("-", "_")
    names = {"percentile_zscore": ("lower", "upper"), "hu_window": ("min", "max")}.get(method, ())
    if not params:
        return {"method": method}
    values = [v for v in params.replace(" ", "").split(",") if v]
    if len(values) != 2 or not names:
        what = f"{method}:{names[0].upper()},{names[1].upper()}" if names else method
        raise UserError(f"--intensity {spec!r}: expected {what}")
    try:
        return {"method": method, names[0]: float(values[0]), names[1]: float(values[1])}
    except ValueError:
        raise UserError(f"--intensity {spec!r}: the parameters must be numbers") from None


def preprocess_overrides(args: argparse.Namespace) -> dict:
    """The preprocessing steps the user replaced on the command line."""
    overrides: dict[str, Any] = {}
    spacing = _triple(args.spacing, "--spacing", float)
    if spacing is not ...:
        overrides["spacing"] = spacing
    size = _triple(args.size, "--size", int)
    if size is not ...:
        overrides["size"] = size
    if args.size_mode is not None:
        overrides["size_mode"] = args.size_mode
    if args.intensity is not None:
        overrides["intensity"] = parse_intensity(args.intensity)
    if args.crop_foreground is not None:
        overrides["crop_foreground"] = args.crop_foreground
    return overrides


# -- models and weights -----------------------------------------------------------------------------

def load_model(args: argparse.Namespace, **kwargs: Any):
    """The model of ``--model``/``--pretrained`` (backbone only) and a label for its weights."""
    from ..weights.factory import create_model, resolve_pretrained

    name, pretrained = resolve_pretrained(args.model, args.pretrained)
    if pretrained is False:
        import torch

        _warn(f"--pretrained {args.pretrained}: {name} has RANDOM weights (--seed {args.seed}); "
              "its features carry no learned meaning")
        with torch.random.fork_rng(devices=[]):  # reproducible weights, and the caller's RNG left as it was
            torch.manual_seed(args.seed)
            model = create_model(name, pretrained=False, num_classes=0, **kwargs)
        return model, weights_label(model, name, pretrained) + f", seed {args.seed}"
    model = create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    return model, weights_label(model, name, pretrained)


def model_preprocess(model, name: str, overrides: dict):
    """The weights' preprocessing with the user's overrides.

    A model with random weights has no preprocessing of its own; it gets the recipe of its
    architecture's default weights, so that ``--pretrained none`` is a dry run of the default path.
    """
    from ..data.preprocess import transforms_for

    base = model
    if not has_weights(model):
        from ..networks.registry import split_name
        from ..weights.manifest import default_entry

        try:
            base = default_entry(split_name(name)[0]).preprocess
        except ValueError:  # no default weights for this depth: the paper's recipe
            base = None
    return transforms_for(base, **overrides)


def weights_label(model, name: str, pretrained: bool | str) -> str:
    """A short description of the weights a model carries, from its ``pretrained_cfg``."""
    if pretrained is False:
        return "random weights (no pretraining)"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    label = cfg.get("name") or name
    if cfg.get("file"):
        where = cfg["file"]
    elif cfg.get("hf_hub_id"):
        where = f"hf://{cfg['hf_hub_id']}@{cfg.get('revision') or 'main'}/{cfg.get('filename')}"
    else:
        where = pretrained if isinstance(pretrained, str) else ""
    sha = cfg.get("sha256")
    extra = ", ".join(x for x in (str(where), f"sha256 {sha[:12]}" if sha else "") if x)
    return f"{label} ({extra})" if extra else str(label)


# -- subcommands ------------------------------------------------------------------------------------


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
    _say(args, "", f"* = the weights `create_model(name, pretrained=True)` loads; details: {PROG} info NAME")
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
    from ..weights.pretrained import _build_without_init

    try:
        model = _build_without_init(arch, {"num_classes": 0})  # on the meta device: shapes only
    except Exception:  # an architecture this version cannot build: nothing to estimate
        return "?"
    return "~" + _size(sum(t.numel() * 4 for t in model.state_dict().values()))


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_info(args: argparse.Namespace) -> int:
    from ..data.preprocess import transforms_for
    from ..inference.features import describe_preprocess
    from ..networks.registry import split_name
    from ..networks.resnet import ARCHITECTURES
    from ..weights.hub_model import build_model
    from ..weights.manifest import find_entry, load_entries

    arch, tag = split_name(args.name)
    entries = [e for e in load_entries() if e.model == arch]
    entry = None
    if tag is not None or any(e.default for e in entries):
        entry = find_entry(arch, tag)
    model = build_model(arch, num_classes=0)
    params = sum(p.numel() for p in model.parameters())
    spec = ARCHITECTURES[arch]
    info: dict[str, Any] = {
        "name": entry.name if entry else arch,
        "architecture": arch,
        "block": spec["block"],
        "layers": list(spec["layers"]),
        "shortcut": entry.shortcut if entry else spec["shortcut"],
        "parameters": params,
        "embedding_dim": model.num_features,
        "feature_info": [dict(f) for f in model.feature_info],
        "other_weights": [e.name for e in entries if entry is None or e.name != entry.name],
    }
    if entry is not None:
        cfg = entry.cfg()
        info.update(cfg)
        info["default"] = entry.default
        info["description"] = entry.description
        info["manifest"] = entry.origin
        info["cached"] = _cached_path(entry.sha256)
    preprocess = transforms_for(entry.preprocess if entry else None)
    info["preprocess"] = preprocess.to_dict()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK

    lines = [f"{info['name']}" + ("  (default weights of " + arch + ")" if entry is not None and entry.default else "")]
    add = lambda key, value: lines.append(f"  {key:<14} {value}")  # noqa: E731
    if entry is not None and entry.description:
        add("description", entry.description)
    add("architecture", f"{arch}: {spec['block']} blocks {'-'.join(map(str, spec['layers']))}, shortcut "
        f"{info['shortcut']}, dilated layer3/4 (output stride 8)")
    add("parameters", f"{params:,} (backbone), embedding {model.num_features}-d")
    add("feature maps", ", ".join(f"{f['module']} {f['num_chs']} ch /{f['reduction']}" for f in model.feature_info[1:]))
    if entry is None:
        add("weights", "none in the manifest: random init only")
    else:
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
        cached = info["cached"]
        add("cached", cached or f"no (fill the cache with `{PROG} download {entry.name}`)")
    add("preprocessing", describe_preprocess(preprocess))
    if info["other_weights"]:
        add("other weights", ", ".join(info["other_weights"]))
    print("\n".join(lines))
    return EXIT_OK


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
        _say(args, f"{name}: sha256 {cfg.get('sha256', '?')} verified; "
                   f"{'cached at ' + cached if cached else 'in the cache'} ({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


def _manifest_repos() -> list[str]:
    from ..weights.manifest import load_entries

    return sorted({e.hf_hub_id for e in load_entries() if e.hf_hub_id})


def cmd_cache(args: argparse.Namespace) -> int:
    from ..weights import hub

    s = hub.settings()
    repos = _manifest_repos()
    if args.action != "clear" and args.kinds:
        raise UserError(f"{PROG} cache {args.action} takes no kind; kinds go with `{PROG} cache clear`")
    if args.action == "list":
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
    if args.action == "clear":
        kinds = args.kinds or list(hub.cache_kinds(s, repos))
        try:
            removed = hub.clear_cache(s, kinds, repos)
        except ValueError as error:
            raise UserError(str(error)) from None
        for u in removed:
            _say(args, f"{u.kind}: removed {u.files} file(s), {_bytes(u.bytes)}")
        return EXIT_OK
    report = hub.verify_cache(s, repos)
    bad = [(path, problem) for path, problem in report if problem]
    if args.json:
        print(json.dumps([{"file": str(p), "ok": q is None, "problem": q} for p, q in report], indent=2))
    else:
        for path, problem in bad:
            print(f"{PROG}: removed {path}: {problem}", file=sys.stderr)
        _say(args, f"verified {len(report)} cached file(s) in {s.cache} and {s.hub_cache}: "
                   f"{len(report) - len(bad)} good, {len(bad)} bad (removed; they are fetched again when needed)")
    return EXIT_FAILED_INPUTS if bad else EXIT_OK


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _check_runtime(args: argparse.Namespace) -> None:
    """Device, autocast and threads, checked before the weights are fetched."""
    from ..inference.runtime import check_amp, resolve_device

    check_amp(args.amp, resolve_device(args.device), force=args.force_amp)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_features(args: argparse.Namespace) -> int:
    from ..inference.features import check_output, describe_preprocess, iter_features, save_features, stack_results
    from ..weights.factory import resolve_pretrained

    overrides = preprocess_overrides(args)
    inputs = list(args.inputs)
    if args.inputs_from:
        inputs += _read_list(args.inputs_from)
    if not inputs:
        raise UserError("no inputs: give scan files or DICOM folders, or --inputs-from FILE")
    maps = args.maps
    output = check_output(args.output, maps, inputs)
    resolve_pretrained(args.model, args.pretrained)  # option errors first, then the inputs, before any download
    _check_runtime(args)
    _check_inputs_exist(inputs)
    model, label = load_model(args)
    preprocess = model_preprocess(model, args.model, overrides)
    _say(args, f"{PROG} features: {len(inputs)} input(s), {args.model} with {label}",
         f"  preprocessing: {describe_preprocess(preprocess)}")
    progress = (not args.quiet) and (args.progress if args.progress is not None else sys.stderr.isatty())
    start = time.perf_counter()
    results, failures = [], []
    for result in iter_features(
        model, inputs, preprocess=preprocess, maps=maps, batch_size=args.batch_size, device=args.device,
        amp=args.amp, force_amp=args.force_amp, fast=not args.no_fast, workers=args.workers, progress=progress,
        nan_policy=args.nan_policy,
    ):
        if result.ok:
            results.append(result)
        else:
            failures.append(result)
            print(f"{PROG}: skipped {_one_line(result.error)}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    if not results:
        print(f"{PROG}: error: all {len(inputs)} input(s) failed; nothing written to {output}", file=sys.stderr)
        return EXIT_FAILED_INPUTS
    features = stack_results(results, maps)
    provenance = None
    if maps == "pooled":
        from ..inference.feature_scores import feature_provenance

        provenance = feature_provenance(model, preprocess, volumes=len(results), feature_dim=features.shape[1],
                                        input_shapes=[r.shape for r in results], amp=args.amp)
    save_features(output, features, [r.name for r in results], provenance=provenance)
    shape = {k: v.shape for k, v in features.items()} if isinstance(features, dict) else features.shape
    _say(args, f"  wrote {output}: {shape} float32 from {len(results)} of {len(inputs)} input(s) in {elapsed:.1f} s")
    if failures:
        print(f"{PROG}: {len(failures)} of {len(inputs)} input(s) failed and have no row in {output}: "
              + ", ".join(r.name for r in failures), file=sys.stderr)
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def cmd_fid(args: argparse.Namespace) -> int:
    """FID, KID and MMD between two sets: saved features (.npz) or scans, with their provenance."""
    import shlex

    from ..inference.feature_scores import (
        expand_scans, features_of_scans, is_feature_file, read_feature_file, score_sets, split_sets, summary_lines,
    )
    from ..files import atomic_write

    if args.json and args.json != "-" and not Path(args.json).expanduser().parent.is_dir():
        raise UserError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise UserError(f"--bandwidth must be > 0, got {args.bandwidth}")
    sets, model = [], None
    for group in split_sets(args.inputs):
        if is_feature_file(group):
            sets.append(read_feature_file(group[0]))
            continue
        if model is None:
            _check_runtime(args)
            import torch

            torch.manual_seed(args.seed)  # random weights (--pretrained none) are then the same on every run
            model, label = load_model(args)
            preprocess = model_preprocess(model, args.model, preprocess_overrides(args))
            _say(args, f"{PROG} fid: features of {args.model} with {label}")
        scans = expand_scans(group)
        source = group[0] if len(group) == 1 else f"{len(group)} scans in {os.path.dirname(group[0]) or '.'}"
        _say(args, f"  {source}: {len(scans)} scan(s)")
        sets.append(features_of_scans(
            model, scans, preprocess, source=source, seed=None if has_weights(model) else args.seed,
            amp=args.amp, force_amp=args.force_amp, device=args.device, batch_size=args.batch_size, workers=args.workers,
            progress=(not args.quiet) and sys.stderr.isatty()))
    report = score_sets(*sets, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                        bandwidth=args.bandwidth, bootstrap=args.bootstrap, seed=args.seed, force=args.force)
    report["command"] = shlex.join([PROG, *getattr(args, "argv", [])])
    for note in report["warnings"]:
        _warn(note)
    if args.json:
        text = json.dumps(report, indent=2) + "\n"
        if args.json == "-":
            print(text, end="")
        else:
            with atomic_write(Path(args.json).expanduser(), "w") as handle:
                handle.write(text)
    if args.json != "-":
        _say(args, *summary_lines(report), *([f"wrote {args.json}"] if args.json else []))
    return EXIT_OK


def _check_inputs_exist(inputs: list[str]) -> None:
    """When no input exists there is nothing to do: say so before any weights are fetched.

    Some missing among others are reported and skipped with the other failures (exit code 1).
    """
    if not any(Path(p).expanduser().exists() for p in inputs):
        shown = ", ".join(inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
        raise UserError(f"no such file or folder: {shown}; give NIfTI files, DICOM series folders or .npy arrays")


def _read_list(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"--inputs-from {path}: {err.strerror or err}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def cmd_demo(args: argparse.Namespace) -> int:
    from ..inference.demo import DEFAULT_SCANS, run_demo
    from ..networks.registry import split_name
    from ..weights.factory import resolve_pretrained

    overrides = preprocess_overrides(args)
    resolve_pretrained(args.model, args.pretrained)  # option errors first, then the scans, before any download
    _check_runtime(args)
    paths = [scan for scan in args.scan or () if scan not in DEFAULT_SCANS]
    if paths:
        _check_inputs_exist(paths)
    model, label = load_model(args)
    run_demo(
        model,
        weights=label,
        random_weights=not has_weights(model),
        model_name=split_name(args.model)[0],
        scans=args.scan or None,
        out_dir=args.out_dir,
        preprocess=model_preprocess(model, args.model, overrides),
        device=args.device,
        amp=args.amp,
        force_amp=args.force_amp,
        echo=(lambda *_: None) if args.quiet else (lambda line: print(line, flush=True)),
    )
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """Everything after ``train`` goes to the co-training command line (``cli/train.py``)."""
    from .train import main as train_main

    try:
        return int(train_main(list(args.train_args), prog=f"{PROG} train") or 0)
    except SystemExit as exit_:  # its --help, or an argparse usage error it already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def _preprocess_argument(text: str | None) -> dict | None:
    """--preprocess: a JSON object, or a file holding one."""
    if text is None:
        return None
    path = Path(text).expanduser()
    try:
        raw = path.read_text(encoding="utf-8") if path.is_file() else text
        value = json.loads(raw)
    except OSError as err:
        raise UserError(f"--preprocess {text}: {err.strerror or err}") from None
    except ValueError:
        raise UserError(
            f"--preprocess {text!r}: expected a JSON object such as '{{\"intensity\": {{\"method\": \"hu_window\", "
            "\"min\": -200, \"max\": 250}}}}', or a file holding one"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"--preprocess {text!r}: expected a JSON object, got {type(value).__name__}")
    return value


def cmd_export(args: argparse.Namespace) -> int:
    from ..publishing.export import export
    from ..publishing.run import read_run

    run = read_run(args.run, checkpoint=args.checkpoint, preprocess=_preprocess_argument(args.preprocess),
                   datasets=args.dataset)
    name = f"{run.architecture}.{args.tag}" if args.tag else run.architecture
    exported = export(run, args.output, license=args.license, medicalnet_pth=args.medicalnet_pth,
                      repo_id=args.repo_id, tag=args.tag, description=args.description)
    _say(args, f"{PROG} export: {name} from {run.kind} {run.path}" + (f" (step {run.step})" if run.step is not None else ""),
         f"  wrote {exported.folder}: {', '.join(exported.files)}",
         f"  model.safetensors: {exported.size:,} bytes, sha256 {exported.sha256}",
         f"  licence {exported.license}; nothing was uploaded (publish with `{PROG} publish`)")
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from ..publishing.publish import publish

    published = publish(
        args.run, repo_id=args.repo_id, tag=args.tag, manifest=args.manifest, private=args.private,
        revision_message=args.revision_message, force=args.force, default=args.default, license=args.license,
        preprocess=_preprocess_argument(args.preprocess), checkpoint=args.checkpoint, datasets=args.dataset,
        description=args.description, medicalnet_pth=args.medicalnet_pth, verify_timeout=args.verify_timeout,
        echo=lambda line: _say(args, line),
    )
    _say(args, f"published {published.name}: hf://{published.repo_id}@{published.revision}/{published.entry['filename']}",
         f"  load it with MED3D_HUB_MANIFEST={published.manifest} and "
         f"med3d_hub.create_model({published.name!r}, pretrained=True)")
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    """``finetune seg|cls``: the options are ``med3d_hub.cli.finetune``'s; errors keep their lines."""
    from .finetune import run

    try:
        return int(run(args) or 0)
    except Med3DError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code


def cmd_compare(args: argparse.Namespace) -> int:
    from ..publishing.compare import as_json, compare_runs, format_table, plot_comparison

    metric, goal, curves = compare_runs(args.runs, metric=args.metric, target=args.target, labels=args.label)
    png = plot_comparison(metric, goal, curves, args.output)
    if args.json:
        print(as_json(metric, goal, curves))
    else:
        _say(args, format_table(metric, goal, curves, args.target), "", f"curves: {png}")
    return EXIT_OK


def _train_available() -> bool:
    import importlib.util

    try:
        spec = importlib.util.find_spec("med3d_hub.train")
    except (ImportError, ValueError):
        return False
    return spec is not None


# -- the parser -------------------------------------------------------------------------------------

EPILOG = f"""\
examples:
  {PROG} demo                                  a real scan -> features + a picture
  {PROG} list                                  models and their pretrained weights
  {PROG} info resnet50.3dseg8                  parameters, source, licence, preprocessing, sha256
  {PROG} download resnet50.3dseg8              fill the cache ahead (for offline clusters)
  {PROG} features scans/*.nii.gz dicom_dir/ --model resnet50 --pretrained 3dseg8 -o feats.npy
  {PROG} fid real/ synthetic/ --model resnet50 --json scores.json   FID, KID, MMD with provenance
  {PROG} export runs/3dseg8 --output export/           files ready to upload (nothing is sent)
  {PROG} publish runs/3dseg8 --repo-id org/med3d-resnet10 --tag 3dseg8-v2 --manifest weights.json

exit codes: 0 ok, 1 some inputs failed, 2 usage or user error, 3 Hub unreachable (weights: nothing
cached; publish: nothing sent), 4 publish failed after the upload began, 70 internal error.
environment: HF_ENDPOINT (Hub mirror), HF_HOME (cache), HF_HUB_OFFLINE=1 (cache only), HF_TOKEN,
MED3D_HUB_MANIFEST (extra weights manifests), HF_HUB_DISABLE_XET=1 (publish to a self-hosted Hub).
"""

EXPORT_EPILOG = f"""\
examples:
  {PROG} export runs/3dseg8 --output export/ --license cc-by-sa-4.0
  {PROG} export runs/3dseg8 --output export/ --checkpoint latest      a run that has not finished
  {PROG} export finetuned/ --output export/ --license mit --dataset "LiTS (CT)"   a save_pretrained folder

RUN is a co-training run folder (config.yaml, encoder.safetensors, metrics.jsonl, curves.png) or a
model folder (config.json + model.safetensors, as model.save_pretrained writes it; any head).
The export holds model.safetensors, config.json, README.md (model card), training_config.yaml,
metrics.jsonl, curves.png (those the run has) and, with --medicalnet-pth, resnet_DEPTH.pth.
"""

PUBLISH_EPILOG = f"""\
examples:
  {PROG} publish runs/3dseg8 --repo-id org/med3d-resnet10-3dseg8 --tag 3dseg8-v2 --manifest weights.json
  {PROG} publish finetuned/ --repo-id org/liver-seg --tag lits-ft --manifest weights.json --license mit --private
  HF_ENDPOINT=https://hub.example.org HF_HUB_DISABLE_XET=1 {PROG} publish ...     a self-hosted Hub

Steps: check the weights (finite, strict load) and the tag; export; upload every file in one commit;
load the weights back by name.tag in a fresh process (empty caches, pinned commit, sha256 checked,
outputs equal); only then add the entry to the manifest, atomically. The token comes from HF_TOKEN or
`hf auth login` and is never printed or written.
"""

FEATURES_EPILOG = f"""\
examples:
  {PROG} features scans/*.nii.gz -o feats.npz                       default model and weights
  {PROG} features ct_series/ --model resnet50 --pretrained 3dseg8 -o feats.csv
  {PROG} features a.nii.gz b.nii.gz --maps -o maps.npy --size 56 224 224   layer4 maps
  {PROG} features --inputs-from list.txt --intensity hu_window:-200,250 -o feats.parquet
  {PROG} features scan.nii.gz --pretrained ~/weights/resnet_10.pth -o f.npy  a local MedicalNet file

inputs: NIfTI files (.nii, .nii.gz), folders holding one DICOM series, or 3-D .npy arrays. Rows
follow the input order; an input that fails is reported on stderr and skipped (exit code 1).
outputs: .npy (array), .npz (features + file names + provenance, for med3d fid), .csv / .parquet
(file column + f0..fC-1).
"""

FID_EPILOG = f"""\
examples:
  {PROG} fid real/ synthetic/ --model resnet50 --json scores.json      two folders of scans
  {PROG} fid real/*.nii.gz synthetic/*.nii.gz --model resnet50         files of two folders
  {PROG} features real/*.nii.gz -o real.npz ; {PROG} fid real.npz synth.npz   saved features, no network
  {PROG} fid real.npz synthetic/ --bootstrap 1000 --seed 0            a confidence interval

Scores: FID (Frechet distance of the pooled layer4 features, float64), KID (unbiased polynomial-kernel
MMD^2, mean and std over subsets), unbiased MMD^2 with RBF and linear kernels. Every scan of a set
must be read: a failed scan is an error, not a smaller set.
"""

DEMO_EPILOG = f"""\
examples:
  {PROG} demo                                     MNI152 T1 (and the InVesalius head CT if installed)
  {PROG} demo --model resnet50 --out-dir pics
  {PROG} demo --pretrained ~/weights/resnet_10.pth  weights from a local file, no network
  {PROG} demo --scan my_scan.nii.gz --size 56 224 224
  {PROG} demo --pretrained none                   random weights (to try the pipeline offline)
"""


def _export_options() -> argparse.ArgumentParser:
    group = argparse.ArgumentParser(add_help=False)
    group.add_argument("run", metavar="RUN", help="a co-training run folder, or a model folder (config.json + model.safetensors)")
    g = group.add_argument_group("what is exported")
    g.add_argument("--license", metavar="ID",
                   help="licence of the weights (mit, apache-2.0, cc-by-4.0, cc-by-sa-4.0, other, ...); "
                        "default: the licence all training datasets state in their dataset.json")
    g.add_argument("--checkpoint", metavar="latest|FILE",
                   help="export a training checkpoint instead of the run's encoder.safetensors")
    g.add_argument("--preprocess", metavar="JSON|FILE",
                   help="the preprocessing the weights expect (default: the run's, or the model folder's config.json)")
    g.add_argument("--dataset", action="append", metavar="NAME",
                   help="a training dataset, for the card and manifest (repeatable; default: the run's tasks)")
    g.add_argument("--description", metavar="TEXT", help="one line describing the weights")
    g.add_argument("--medicalnet-pth", action="store_true",
                   help="also write resnet_DEPTH.pth in MedicalNet's layout, for upstream code")
    return group


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34)


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Med3D 3D ResNets for CT and MRI: pretrained weights, preprocessing and feature extraction.",
        epilog=EPILOG,
        formatter_class=_Formatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} (med3d-hub)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("list", parents=[common], formatter_class=_Formatter, help="models and pretrained weights, as a table",
                       description="List the models and their pretrained weights (from the weights manifest).",
                       epilog=f"examples:\n  {PROG} list\n  {PROG} list 'resnet5*'\n  {PROG} list --json")
    p.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'resnet1*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", parents=[common], formatter_class=_Formatter,
                       help="parameters, source, licence, preprocessing, sha256 of a model or weights",
                       description="Describe a model and its weights: architecture, parameter count, file, checksum, "
                                   "licence, training data and preprocessing. Never touches the network.",
                       epilog=f"examples:\n  {PROG} info resnet50            its default weights\n"
                              f"  {PROG} info resnet10.23datasets\n  {PROG} info resnet50 --json")
    p.add_argument("name", help="resnet50 (default weights) or resnet50.3dseg8")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download", parents=[common], formatter_class=_Formatter,
                       help="fetch and verify weights into the cache ahead of time",
                       description="Download weights, verify their sha256 and convert them into the cache, so that "
                                   "later runs (e.g. on offline compute nodes sharing HF_HOME) need no network.",
                       epilog=f"examples:\n  {PROG} download resnet50.3dseg8\n  {PROG} download resnet10 resnet50\n"
                              f"  {PROG} download --all\n  HF_ENDPOINT=https://mirror.example {PROG} download resnet50")
    p.add_argument("names", nargs="*", help="weights names (resnet50 means its default weights)")
    p.add_argument("--all", action="store_true", help="every set of weights in the manifest")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("features", parents=[common, _model_options("resnet10"), _preprocess_options(), _runtime_options()],
                       formatter_class=_Formatter, help="embeddings or feature maps of scans, to .npy/.npz/.csv/.parquet",
                       description="Read scans, preprocess them as the weights expect, and write one embedding (or "
                                   "feature map) per scan.",
                       epilog=FEATURES_EPILOG)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="NIfTI files, DICOM series folders or .npy arrays")
    p.add_argument("--inputs-from", metavar="FILE", help="read more inputs from FILE, one per line ('-' = stdin)")
    p.add_argument("--output", "-o", required=True, help="output file: .npy, .npz, .csv or .parquet")
    p.add_argument("--maps", nargs="?", const="layer4", default="pooled", choices=("pooled", "layer4", "stages"),
                   help="instead of pooled embeddings, write the layer4 map (--maps) or the layer1-4 maps "
                        "(--maps stages, .npz only)")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=1,
                   help="volumes per forward; volumes of equal preprocessed shape are batched (default 1)")
    p.add_argument("--workers", type=_positive_int, default=1, help="threads reading ahead of the network (default 1)")
    p.add_argument("--no-fast", action="store_true",
                   help="run the plain model instead of the BatchNorm-folded channels_last copy (same results)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over the inputs (default: when stderr is a terminal)")
    p.add_argument("--nan-policy", choices=("error", "zero"), default="error",
                   help="an input with NaN or infinite voxels fails (error, the default) or has them set to 0 (zero)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("fid", parents=[common, _model_options("resnet10"), _preprocess_options(), _runtime_options()],
                       formatter_class=_Formatter, help="FID, KID and MMD between two sets of scans or saved features",
                       description="Score a generative model: the Frechet distance (FID), KID and MMD between the Med3D "
                                   "features of two sets, with everything needed to compare the numbers (weights, "
                                   "sha256, layer, pooling, preprocessing, input size). Saved feature files made "
                                   "differently are refused. See docs/metrics.md.",
                       epilog=FID_EPILOG)
    p.add_argument("inputs", nargs="+", metavar="SET",
                   help="two folders of scans, two .npz files from `med3d features`, one of each, or real/*.nii.gz fake/*.nii.gz")
    p.add_argument("--json", metavar="FILE", help="write the scores and their provenance as JSON ('-': stdout)")
    p.add_argument("--bootstrap", type=_positive_int, metavar="N", default=0, help="a 95%% bootstrap interval of the FID from N resamples")
    p.add_argument("--kid-subsets", type=_positive_int, default=100, metavar="N", help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=_positive_int, default=1000, metavar="N",
                   help="volumes per KID subset, capped at the smaller set (default 1000)")
    p.add_argument("--bandwidth", type=float, metavar="S", help="RBF bandwidth of the MMD (default: the median pairwise distance)")
    p.add_argument("--force", action="store_true", help="compare feature sets whose provenance differs")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=1, help="volumes per forward (default 1)")
    p.add_argument("--workers", type=_positive_int, default=1, help="threads reading ahead of the network (default 1)")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("cache", parents=[common], formatter_class=_Formatter,
                       help="where the caches are, their sizes; clear or verify them",
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

    p = sub.add_parser("demo", parents=[common, _model_options("resnet10"), _preprocess_options(), _runtime_options()],
                       formatter_class=_Formatter, help="a real scan -> features + a picture",
                       description="Run a Med3D model on real scans shipped by installed packages (nilearn's MNI152 "
                                   "T1 template; the InVesalius head CT of Debian's invesalius-examples when "
                                   "installed), print what was done, and save a picture of each scan's mid-planes "
                                   "beside the layer4 activation map.",
                       epilog=DEMO_EPILOG)
    p.add_argument("--scan", action="append", metavar="SCAN",
                   help="mni, ct, or a path (NIfTI, DICOM folder, .npy, .inv3); repeatable (default: mni and ct)")
    p.add_argument("--out-dir", default="med3d_demo", help="where the pictures and embeddings go (default med3d_demo)")
    p.set_defaults(func=cmd_demo)

    exporting = _export_options()
    p = sub.add_parser("export", parents=[common, exporting], formatter_class=_Formatter,
                       help="a trained run -> weights, config and model card, ready to upload (nothing is sent)",
                       description="Export a co-training run or a model folder: model.safetensors (zoo key layout), "
                                   "config.json, a model card with Hub metadata, the training config and curves.",
                       epilog=EXPORT_EPILOG)
    p.add_argument("--output", "-o", required=True, help="a new (or empty) folder for the files")
    p.add_argument("--repo-id", metavar="ORG/NAME", help="the Hub repo, for the card's loading instructions only")
    p.add_argument("--tag", help="the weights tag, for the card's loading instructions only")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("publish", parents=[common, exporting], formatter_class=_Formatter,
                       help="upload a trained run to a Hub, verify it loads back, add it to a manifest",
                       description="Publish weights: export, upload in one commit, prove in a fresh process that "
                                   "name.tag loads back at the pinned commit with equal outputs, then add the entry "
                                   "to the manifest. Any failure leaves the manifest unchanged.",
                       epilog=PUBLISH_EPILOG)
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub model repo (created if missing)")
    p.add_argument("--tag", required=True, help="the weights tag: the weights become ARCH.TAG, e.g. resnet50.3dseg8-v2")
    p.add_argument("--manifest", required=True, metavar="PATH", help="the weights manifest to add the entry to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing public repo is refused)")
    p.add_argument("--revision-message", metavar="TEXT", help="the commit message (default: 'Publish ARCH.TAG with med3d-hub')")
    p.add_argument("--force", action="store_true", help="replace an entry of the same name.tag in the manifest")
    p.add_argument("--default", action="store_true", help="make these the architecture's default weights in the manifest")
    p.add_argument("--verify-timeout", type=float, default=900.0, metavar="S",
                   help="seconds the round-trip process may take (default 900)")
    p.set_defaults(func=cmd_publish)

    _add_predict_command(sub, common)

    if _train_available():
        from .finetune import EPILOG as FINETUNE_EPILOG, add_arguments as finetune_arguments

        p = sub.add_parser("finetune", parents=[common], formatter_class=_Formatter,
                           help="fine-tune a Med3D encoder: segmentation (MSD task) or classification (CSV)",
                           description="Fine-tune a Med3D encoder with the paper's transfer recipe (Adam, lr 1e-3 from "
                                       "pretrained weights, 1e-2 from scratch, new layers faster), on the co-training "
                                       "engine (checkpoints, resume, metrics.jsonl, DDP, AMP). See docs/transfer.md.")
        kinds = p.add_subparsers(dest="kind", metavar="seg|cls", title="tasks", required=True)
        for kind, text in (("seg", "segmentation of an MSD task folder: encoder + decoder, Dice + CE"),
                           ("cls", "classification of labelled volumes (CSV): encoder + GAP + FC, CE")):
            q = kinds.add_parser(kind, parents=[common], formatter_class=_Formatter, help=text,
                                 description=f"Fine-tune a Med3D encoder: {text}.", epilog=FINETUNE_EPILOG[kind])
            finetune_arguments(q, kind)
            q.set_defaults(func=cmd_finetune)

        p = sub.add_parser("compare", parents=[common], formatter_class=_Formatter,
                           help="validation curves of several runs (PNG) and steps-to-target (table)",
                           description="Plot a validation metric against step and wall time for several runs and "
                                       "report steps-to-target: the first validated step reaching TARGET x the best "
                                       "final value. The last run is the baseline of the speed-up column.",
                           epilog=f"examples:\n  {PROG} compare runs/liver runs/liver-scratch\n"
                                  f"  {PROG} compare runs/a runs/b --metric dice/Liver --target 0.95 -o liver.png")
        p.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.jsonl")
        p.add_argument("--metric", help="validation key (default: dice_mean, else accuracy)")
        p.add_argument("--target", type=float, default=0.9, help="fraction of the best final value (default 0.9)")
        p.add_argument("--label", action="append", metavar="NAME", help="a name per run, in order (default: folder names)")
        p.add_argument("--output", "-o", default="compare.png", help="the PNG to write (default compare.png)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_compare)

        p = sub.add_parser("train", parents=[common], add_help=False, help="pre-train or fine-tune (see `med3d train --help`)",
                           description="Forwarded to the training package.")
        p.add_argument("train_args", nargs=argparse.REMAINDER)
        p.set_defaults(func=cmd_train)
    return parser


# -- med3d predict ----------------------------------------------------------------------------------

PREDICT_EPILOG = f"""examples:
  {PROG} predict runs/liver-ft ct/*.nii.gz dicom_dir/ -o masks/         one mask per scan (NIfTI, the scan's grid)
  {PROG} predict resnet10.lits-ft ct/*.nii.gz -o masks/ --probabilities  weights published with their head
  {PROG} predict runs/nodule-cls scans/*.nii.gz -o predictions.csv      class probabilities, one row per scan
  {PROG} predict weights.safetensors --model resnet10 scan.nii.gz -o masks/

A segmentation writes SCAN.nii.gz (uint8 labels, the input's shape and affine), SCAN.json (the label
names) and, with --probabilities, SCAN_probabilities.npz (float16 maps). Exit code 1: some inputs failed
(the others were written); 2: a usage error."""


def _add_predict_command(sub, common) -> None:
    p = sub.add_parser("predict", parents=[common, _runtime_options()], formatter_class=_Formatter,
                       help="apply a fine-tuned or published model: masks in each scan's grid, or class probabilities",
                       description="Apply a fine-tuned model (a finetune run folder, an export folder, name.tag, or a "
                                   "weights file with --model) to new scans, with the preprocessing stored with the "
                                   "weights. Segmentation: sliding windows over the whole scan, the mask written on "
                                   "the scan's own grid. Classification: one row of class probabilities per scan.",
                       epilog=PREDICT_EPILOG)
    p.add_argument("source", help="a finetune run folder, a model folder, name.tag, or a weights file (with --model)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="NIfTI files, DICOM series folders or .npy arrays")
    p.add_argument("--inputs-from", metavar="FILE", help="read more inputs from FILE, one per line ('-' = stdin)")
    p.add_argument("--output", "-o", required=True,
                   help="segmentation: a folder for the masks; classification: a .csv or .parquet file")
    p.add_argument("--model", "-m", help="the architecture of a weights file, e.g. resnet10")
    p.add_argument("--batch-size", "-b", type=_positive_int, default=1,
                   help="windows per forward (segmentation) or scans per forward (classification); default 1")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of the sliding windows, in [0, 1) (default 0.25)")
    p.add_argument("--window", nargs=3, type=_positive_int, metavar=("D", "H", "W"),
                   help="sliding window size (default: the training crop)")
    p.add_argument("--probabilities", action="store_true", help="also write float16 per-class maps (segmentation)")
    p.add_argument("--no-fast", action="store_true", help="run the plain model instead of the BatchNorm-folded copy")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over the inputs (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..inference.predict import check_table_output, iter_predictions, load_predictor, mask_path, write_mask, write_table

    inputs = list(args.inputs) + (_read_list(args.inputs_from) if args.inputs_from else [])
    if not inputs:
        raise UserError("no inputs: give scan files or DICOM folders, or --inputs-from FILE")
    _check_runtime(args)
    predictor = load_predictor(args.source, model=args.model, window=args.window)
    output = Path(args.output)
    if predictor.task == "cls":
        check_table_output(output)
    else:
        if not output.is_dir():
            raise UserError(f"--output {output}: a segmentation writes one mask per scan into a folder; create it first")
        kinds = ["array" if i.lower().endswith(".npy") else "nifti" for i in inputs]
        names = [mask_path(i, output, k) for i, k in zip(inputs, kinds)]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"several inputs would write the same mask ({', '.join(twice)}); rename or predict them apart")
    _say(args, f"{PROG} predict: {len(inputs)} input(s), {args.source}: {predictor.describe()}")
    progress = (not args.quiet) and (args.progress if args.progress is not None else sys.stderr.isatty())
    results, failures = [], []
    for result in iter_predictions(predictor, inputs, batch_size=args.batch_size, overlap=args.overlap,
                                   probabilities=args.probabilities, device=args.device, amp=args.amp,
                                   force_amp=args.force_amp, fast=not args.no_fast, progress=progress):
        if not result.ok:
            failures.append(result)
            print(f"{PROG}: skipped {_one_line(result.error)}", file=sys.stderr, flush=True)
        elif predictor.task == "seg":
            written = write_mask(result, mask_path(result.name, output, result.kind), probabilities=args.probabilities,
                                 source=str(args.source))
            _say(args, f"  wrote {written[0]}")
        else:
            results.append(result)
    if predictor.task == "cls" and results:
        write_table(results, output)
        _say(args, f"  wrote {output}: {len(results)} row(s)")
    if failures:
        print(f"{PROG}: {len(failures)} of {len(inputs)} input(s) failed and were not written: "
              + ", ".join(r.name for r in failures), file=sys.stderr)
        return EXIT_FAILED_INPUTS
    return EXIT_OK


# -- entry point ------------------------------------------------------------------------------------


_LOGGERS = ("med3d_hub", "py.warnings")


class _RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) without tokens."""

    def format(self, record: logging.LogRecord) -> str:
        from ..weights.hub import redact

        return redact(super().format(record))


def _configure_logging(quiet: bool, debug: bool):
    """Route the package's log records and Python warnings to stderr as ``med3d: ...`` lines.

    Returns a function that restores the previous configuration, so that ``main()`` called from
    Python leaves the host's logging as it found it.
    """
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger, _LOGGERS)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(f"{PROG}: %(levelname)s: %(message)s" if debug else f"{PROG}: %(message)s"))
    for name, level in zip(_LOGGERS, (logging.DEBUG if debug else logging.WARNING, logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.ERROR if quiet else level)
        logger.propagate = False
    logging.captureWarnings(True)

    def restore() -> None:
        logging.captureWarnings(False)
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``med3d`` with ``argv`` (default: the command line); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and _train_available():  # everything after `train` belongs to the trainer
        args = argparse.Namespace(command="train", func=cmd_train, train_args=argv[1:], quiet=False, debug=False)
    else:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version, or a usage error (argparse printed it)
            return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    args.quiet = getattr(args, "quiet", False)
    args.debug = getattr(args, "debug", False)
    args.argv = argv
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    restore_logging = _configure_logging(args.quiet, args.debug)
    restore_bars = _silence_download_bars() if args.quiet else (lambda: None)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every exception ends here with an exit code
        return _report(err, args.debug, args.command)
    finally:
        restore_bars()
        restore_logging()


def _silence_download_bars():
    """--quiet: no huggingface_hub progress bar on weight downloads; returns the function that restores them.

    Without --quiet the bar is huggingface_hub's own (shown on a terminal; HF_HUB_DISABLE_PROGRESS_BARS=1
    hides it).
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled():
        return lambda: None
    disable_progress_bars()
    return enable_progress_bars


def _report(err: BaseException, debug: bool, command: str | None = None) -> int:
    """Print an error the way its kind asks for (errors.exit_code is the table) and return the exit code."""
    from ..weights.hub import HubUnreachableError

    if debug:
        from ..weights.hub import redact

        print(redact("".join(traceback.format_exception(err))), file=sys.stderr, end="")
    code = exit_code(err)
    if isinstance(err, HubUnreachableError) and command != "publish":
        print(unreachable_message(err, command), file=sys.stderr)
    elif code != EXIT_INTERNAL:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
    else:
        print(f"{PROG}: internal error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        if not debug:
            print(f"{PROG}: this is a bug; rerun with --debug and report the traceback", file=sys.stderr)
    return code


_RANDOM_WAY_OUT = {
    "": "  - random weights:    --pretrained none (to try the pipeline; the features mean nothing)",
    "finetune": "  - from scratch:      --pretrained none (the paper's baseline: the same recipe from random weights)",
}


def unreachable_message(err: BaseException, command: str | None = None) -> str:
    """The Hub could not be reached and nothing is cached: say so, and name the ways out."""
    reason = _one_line(str(err).split(" Ways out:")[0])
    ways = [
        "  - a Hub mirror:      HF_ENDPOINT=https://your-mirror med3d ...",
        "  - the offline cache: run `med3d download NAME` where the Hub is reachable, share HF_HOME, "
        "set HF_HUB_OFFLINE=1",
    ]
    if command != "download":
        ways[1:1] = ["  - a local file:      --pretrained /path/to/resnet_10.pth (a MedicalNet .pth or a .safetensors file)"]
        ways.append(_RANDOM_WAY_OUT.get(command or "", _RANDOM_WAY_OUT[""]))
    return "\n".join([f"{PROG}: error: the pretrained weights could not be fetched: {reason}", "Ways out:", *ways])


if __name__ == "__main__":
    raise SystemExit(main())
