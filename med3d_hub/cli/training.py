"""`med3d train` and `med3d finetune`: their options live in ``cli/train.py`` and ``cli/finetune.py``.

Both exist only where the training package is installed (``pip install 'med3d-hub[train]'``).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_USAGE, Med3DError
from .options import UserError, add_command
from .output import PROG

FINETUNE_TASKS = (("seg", "segmentation of an MSD task folder: encoder + decoder, Dice + CE"),
                  ("cls", "classification of labelled volumes (CSV): encoder + GAP + FC, CE"))


# What `med3d train`, `finetune` and `compare` cannot start without (the `train` extra): module -> package.
TRAIN_REQUIRES = {"monai": "monai", "yaml": "pyyaml"}
TRAIN_INSTALL = "pip install 'med3d-hub[train]' (from a clone: pip install -e \".[io,train]\")"


def missing_train_packages() -> list[str]:
    """The packages of the `train` extra that are not installed (found without importing them)."""
    import importlib.util

    missing = []
    for module, package in TRAIN_REQUIRES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def train_available() -> bool:
    """True when the `train` extra is installed, so that `med3d train`, `finetune` and `compare` can run."""
    return not missing_train_packages()


def add_unavailable_parsers(sub, common: argparse.ArgumentParser) -> None:
    """`train`, `finetune` and `compare` without the `train` extra: each says what to install (exit 2)."""
    for name in ("finetune", "compare", "train"):
        p = sub.add_parser(name, parents=[common], add_help=False, help=f"(needs the train extra: {TRAIN_INSTALL})",
                           description=f"Needs the train extra: {TRAIN_INSTALL}.")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=cmd_unavailable)


def cmd_unavailable(args: argparse.Namespace) -> int:
    raise UserError(
        f"`{PROG} {args.command}` needs the train extra, and {', '.join(missing_train_packages())} "
        f"is not installed: {TRAIN_INSTALL}"
    )


# -- med3d train ------------------------------------------------------------------------------------


def add_train_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], add_help=False, help="pre-train or fine-tune (see `med3d train --help`)",
                       description="Forwarded to the training package.")
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Everything after ``train`` goes to the co-training command line (``cli/train.py``)."""
    from .train import main as train_main

    try:
        return int(train_main(list(args.train_args), prog=f"{PROG} train") or 0)
    except SystemExit as exit_:  # its --help, or an argparse usage error it already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


# -- med3d finetune ---------------------------------------------------------------------------------


def add_finetune_parser(sub, common: argparse.ArgumentParser) -> None:
    from .finetune import EPILOG as FINETUNE_EPILOG, add_arguments as finetune_arguments

    p = add_command(sub, "finetune", common,
                    help="fine-tune a Med3D encoder: segmentation (MSD task) or classification (CSV)",
                    description="Fine-tune a Med3D encoder with the paper's transfer recipe (Adam, lr 1e-3 from "
                                "pretrained weights, 1e-2 from scratch, new layers faster), on the co-training "
                                "engine (checkpoints, resume, metrics.jsonl, DDP, AMP). See docs/transfer.md.")
    kinds = p.add_subparsers(dest="kind", metavar="seg|cls", title="tasks", required=True)
    for kind, text in FINETUNE_TASKS:
        q = add_command(kinds, kind, common, help=text, description=f"Fine-tune a Med3D encoder: {text}.",
                        epilog=FINETUNE_EPILOG[kind])
        finetune_arguments(q, kind)
        q.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``finetune seg|cls``: the options are ``med3d_hub.cli.finetune``'s; errors keep their lines."""
    from .finetune import run

    try:
        return int(run(args) or 0)
    except Med3DError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
