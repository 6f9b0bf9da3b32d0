"""The ``med3d`` command: its parser, the entry point, logging and the error report.

Each command group is a module of its own (``zoo``, ``features``, ``demo``, ``preview``, ``predict``,
``publishing``, ``training``) that adds its subparsers and calls the package's layers; the options they share are in
``options``. Thin by design: a command parses its options and calls the layers below. Exit codes:

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
import logging
import sys
import traceback
from typing import Sequence

from .. import __version__
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, exit_code
from . import demo, features, predict, preview, publishing, training, zoo
from .options import Formatter, common_options
from .output import PROG, one_line

EPILOG = f"""\
examples:
  {PROG} demo                                  a real scan -> features + a picture
  {PROG} list                                  models and their pretrained weights
  {PROG} info resnet50.3dseg8                  parameters, source, licence, preprocessing, sha256
  {PROG} download resnet50.3dseg8              fill the cache ahead (for offline clusters)
  {PROG} features scans/*.nii.gz dicom_dir/ --model resnet50 --pretrained 3dseg8 -o feats.npy
  {PROG} fid real/ synthetic/ --model resnet50 --json scores.json   FID, KID, MMD with provenance
  {PROG} preview scan.nii.gz --convention ha-gan -o preview.png   what the network receives
  {PROG} export runs/3dseg8 --output export/           files ready to upload (nothing is sent)
  {PROG} publish runs/3dseg8 --repo-id org/med3d-resnet10 --tag 3dseg8-v2 --manifest weights.json

exit codes: 0 ok, 1 some inputs failed, 2 usage or user error, 3 Hub unreachable (weights: nothing
cached; publish: nothing sent), 4 publish failed after the upload began, 70 internal error.
environment: HF_ENDPOINT (Hub mirror), HF_HOME (cache), HF_HUB_OFFLINE=1 (cache only), HF_TOKEN,
MED3D_HUB_MANIFEST (extra weights manifests), HF_HUB_DISABLE_XET=1 (publish to a self-hosted Hub).
"""


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Med3D 3D ResNets for CT and MRI: pretrained weights, preprocessing and feature extraction.",
        epilog=EPILOG,
        formatter_class=Formatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} (med3d-hub)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands = [zoo.add_list_parser, zoo.add_info_parser, zoo.add_download_parser, features.add_features_parser,
                features.add_fid_parser, zoo.add_cache_parser, demo.add_demo_parser, preview.add_preview_parser, publishing.add_export_parser,
                publishing.add_publish_parser, predict.add_predict_parser]
    if training.train_available():
        commands += [training.add_finetune_parser, publishing.add_compare_parser, training.add_train_parser]
    else:
        commands.append(training.add_unavailable_parsers)
    for add_parser in commands:  # the order of `med3d --help`
        add_parser(sub, common)
    return parser


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
    if argv[:1] == ["train"]:  # everything after `train` belongs to the trainer
        run = training.cmd_train if training.train_available() else training.cmd_unavailable
        args = argparse.Namespace(command="train", func=run, train_args=argv[1:], quiet=False, debug=False)
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
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
    else:
        print(f"{PROG}: internal error: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        if not debug:
            print(f"{PROG}: this is a bug; rerun with --debug and report the traceback", file=sys.stderr)
    return code


_RANDOM_WAY_OUT = {
    "": "  - random weights:    --pretrained none (to try the pipeline; the features mean nothing)",
    "finetune": "  - from scratch:      --pretrained none (the paper's baseline: the same recipe from random weights)",
}


def unreachable_message(err: BaseException, command: str | None = None) -> str:
    """The Hub could not be reached and nothing is cached: say so, and name the ways out."""
    reason = one_line(str(err).split(" Ways out:")[0])
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
