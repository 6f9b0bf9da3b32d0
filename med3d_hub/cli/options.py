"""The options several `med3d` commands share, written once: option groups, argument types, input lists.

A command module builds its subparser from these groups and adds only the options that are its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import EXIT_USAGE, Med3DError

DEFAULT_MODEL = "resnet10"


class UserError(Med3DError):
    """An error in the command's arguments; printed as one line without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = code


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples in the epilogs keep their lines; option names get a wider column."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34)


# -- option groups ----------------------------------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """--quiet/--debug, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print only errors and warnings (no progress bar, no summary)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    return common


def model_options(default_model: str) -> argparse.ArgumentParser:
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


def preprocess_options() -> argparse.ArgumentParser:
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
    g.add_argument("--size-mode", choices=("resize", "crop_pad", "resize_skimage"),
                   help="reach --size by trilinear resizing or by centre crop / zero pad")
    g.add_argument("--intensity", metavar="SPEC",
                   help="percentile_zscore[:LOW,HIGH] | nonzero_zscore | hu_window:MIN,MAX | zscore | "
                        "window_scale:MIN,MAX | none")
    g.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction, default=None,
                   help="crop to the bounding box of non-zero voxels before normalising")
    return group


def runtime_options() -> argparse.ArgumentParser:
    group = argparse.ArgumentParser(add_help=False)
    g = group.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    g.add_argument("--amp", choices=("bf16", "fp16"),
                   help="autocast the forward; refused on a CPU without native support (it is hundreds of times slower there)")
    g.add_argument("--force-amp", action="store_true", help="use --amp even where it is emulated and slow")
    g.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    return group


def add_command(sub, name: str, *parents: argparse.ArgumentParser, **texts: str) -> argparse.ArgumentParser:
    """A subcommand with the shared help layout; ``texts`` are its help, description and epilog."""
    return sub.add_parser(name, parents=list(parents), formatter_class=Formatter, **texts)


def add_model_command(sub, common: argparse.ArgumentParser, name: str, **texts: str) -> argparse.ArgumentParser:
    """A subcommand that runs a zoo model on scans: the model, preprocessing and runtime groups."""
    return add_command(sub, name, common, model_options(DEFAULT_MODEL), preprocess_options(), runtime_options(), **texts)


def add_convention_option(p: argparse.ArgumentParser) -> None:
    """--convention: a published way of computing 3D FID (weights, preprocessing, layer, pooling, estimator).

    ``--model`` then defaults to the convention's (DEFAULT_MODEL for med3d's own).
    """
    p.add_argument("--convention", metavar="NAME",
                   help="compute as a published 3D FID convention does: ha-gan, monai-generative, medmetric, ... "
                        "(med3d fid --list-conventions); default med3d, the weights' own preprocessing")
    p.set_defaults(model=None)


def add_inputs(p: argparse.ArgumentParser) -> None:
    """The scans a command reads: paths on the command line, --channels cases, --inputs-from, and what to read of each."""
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="NIfTI, NRRD or MetaImage files, DICOM folders (each series is an input) or .npy arrays")
    p.add_argument("--inputs-from", metavar="FILE",
                   help="read more inputs from FILE, one per line ('-' = stdin); a .csv: one case per row, a column "
                        "per channel file (paths from the CSV's folder) and an optional name column")
    p.add_argument("--channels", action="append", metavar="FILE,FILE,...",
                   help="one case of several channels, a file each on one voxel grid, for a model with that many "
                        "input channels; repeat it per case")
    p.add_argument("--series", metavar="UID",
                   help="read only this SeriesInstanceUID of each DICOM folder (default: every series, one input each)")
    add_channel_option(p, allow_all=True)


def add_channel_option(p: argparse.ArgumentParser, allow_all: bool = False) -> None:
    """--channel: one volume of each 4-D input (or, with ``allow_all``, all of them as channels)."""
    p.add_argument("--channel", type=channel_index if not allow_all else channel_choice,
                   metavar="N|all" if allow_all else "N",
                   help="volume N (from 0) of each 4-D input, e.g. one MRI modality"
                        + ("; 'all': every volume, as the channels of a model with several" if allow_all else ""))


def add_reading_options(p: argparse.ArgumentParser, batch_help: str) -> None:
    """Batching and read-ahead threads of a command that extracts features."""
    p.add_argument("--batch-size", "-b", type=positive_int, default=1, help=batch_help)
    p.add_argument("--workers", type=positive_int, default=1, help="threads reading ahead of the network (default 1)")


def add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over the inputs (default: when stderr is a terminal)")


# -- reading the options ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "a positive integer")


def channel_index(text: str) -> int:
    return _whole_number(text, 0, "a channel number (0, 1, ...)")


def _whole_number(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def channel_choice(text: str) -> int | str:
    return text.lower() if text.lower() == "all" else channel_index(text)


def show_progress(args: argparse.Namespace) -> bool:
    """--progress, --no-progress, or a bar when stderr is a terminal; never with --quiet."""
    return (not args.quiet) and (args.progress if args.progress is not None else sys.stderr.isatty())


def inputs_of(args: argparse.Namespace) -> list:
    """The inputs in order, as the items to read (``data/inputs.py``): those on the command line, the
    --channels cases, then those of --inputs-from; each series of a DICOM folder is an item of its own."""
    from ..data.inputs import expand_inputs, read_case_table

    entries: list = list(args.inputs) + [[f for f in files.split(",") if f] for files in args.channels or []]
    if args.inputs_from:
        is_table = args.inputs_from != "-" and args.inputs_from.lower().endswith(".csv")
        entries += read_case_table(args.inputs_from) if is_table else read_list(args.inputs_from)
    if not entries:
        raise UserError("no inputs: give scan files or DICOM folders, --channels FILES, or --inputs-from FILE")
    return expand_inputs(entries, series=args.series, channel=args.channel)


def read_list(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"--inputs-from {path}: {err.strerror or err}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_inputs_exist(inputs: list[str]) -> None:
    """When no input exists there is nothing to do: say so before any weights are fetched.

    Some missing among others are reported and skipped with the other failures (exit code 1).
    """
    paths = [p for item in inputs for p in ([item] if isinstance(item, str) else item.paths)]
    if not any(Path(p).expanduser().exists() for p in paths):
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise UserError(f"no such file or folder: {shown}; give NIfTI, NRRD or MetaImage files, DICOM folders "
                        "or .npy arrays")


def check_runtime(args: argparse.Namespace) -> None:
    """Device, autocast and threads, checked before the weights are fetched."""
    from ..inference.runtime import check_amp, resolve_device

    check_amp(args.amp, resolve_device(args.device), force=args.force_amp)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


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
    names = {"percentile_zscore": ("lower", "upper"), "hu_window": ("min", "max"),
             "window_scale": ("min", "max")}.get(method, ())
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
