"""Command line of the co-training: ``python -m med3d_hub.train``, ``torchrun -m med3d_hub.train``, ``med3d train``.

A config file gives the run; flags override single settings for quick runs. ``--data FOLDER``
(repeatable) replaces the config's task list by these MSD task folders: a folder with the same
name as a configured task's folder keeps that task's settings, any other folder becomes a task
named after its ``dataset.json`` (classes from its ``labels``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable

from ..errors import exit_code, is_user_error
from ..training.config import ConfigError, TaskConfig, TrainConfig, load_config

__all__ = ["build_config", "main", "parser"]


AMP_HELP = ("mixed precision: auto (bf16 on a GPU that has it, else fp32), none, bf16 or fp16 (on a CPU only "
            "where it computes that type natively)")

EPILOG = """\
examples:
  med3d train --config configs/3dseg8.yaml --data-root /data/msd --output runs/3dseg8-r50
  med3d train --config configs/3dseg8.yaml --data-root /data/msd --output runs/3dseg8-r50 --resume
  med3d train --data Task09_Spleen --data Task04_Hippocampus --model resnet10 --steps 200 --output runs/try
  python -m med3d_hub.training.synthetic /tmp/synth --classes 2 3      synthetic MSD tasks to try it out
  torchrun --nproc_per_node=8 -m med3d_hub.train --config configs/3dseg8.yaml --data-root /data/msd --output runs/r50

A task folder is an MSD task: dataset.json (labels, training list), imagesTr/ and labelsTr/.
exit codes: 0 done, 1 training diverged (NaN loss), 2 config, data or checkpoint error.
"""


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m med3d_hub.train",
        description="Co-train a Med3D encoder on MSD segmentation tasks (3DSeg-8), on one or many processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (a local file, or a packaged one such as configs/3dseg8.yaml)")
    p.add_argument("--data", action="append", metavar="FOLDER", help="an MSD task folder; repeat for each task")
    p.add_argument("--data-root", help="folder that relative task paths of the config are taken from")
    p.add_argument("--model", help="encoder: resnet10, resnet18, resnet34, resnet50, resnet101, resnet152, resnet200")
    p.add_argument("--steps", type=int, help="optimiser steps in total")
    p.add_argument("--batch-size", type=int, help="crops per micro-batch (per process and accumulation step)")
    p.add_argument("--accum-steps", type=int, help="micro-batches accumulated per process and step")
    p.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"), help="crop size in voxels")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--output", help="run folder: checkpoints, metrics, encoder.safetensors")
    p.add_argument("--cache-dir", help="where preprocessed volumes are cached")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], help=AMP_HELP)
    p.add_argument("--workers", type=int, help="data loader worker processes per training process")
    p.add_argument("--seed", type=int)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines (errors, metrics.jsonl and checkpoints stay)")
    p.add_argument("--skip-bad-cases", action="store_true", default=None,
                   help="warn about unusable cases and train without them instead of stopping")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --output (or from CHECKPOINT); "
                        "starts a new run when there is none yet")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set val_every=200 --set optimizer=adamw")
    return p


def _task_name(folder: Path) -> str:
    import json

    name = ""
    meta_path = folder / "dataset.json"
    if meta_path.is_file():
        try:
            name = str(json.loads(meta_path.read_text()).get("name", ""))
        except (OSError, ValueError, AttributeError):
            name = ""
    if not name:
        name = re.sub(r"^Task\d+_", "", folder.name)
    name = re.sub(r"\W", "_", name).strip("_") or "task"
    return name if name[0].isalpha() else "t_" + name


def tasks_from_folders(folders: list[str], configured: list[TaskConfig]) -> list[TaskConfig]:
    by_folder = {Path(t.path).name: t for t in configured}
    tasks: list[TaskConfig] = []
    for raw in folders:
        folder = Path(raw).expanduser().resolve()
        known = by_folder.get(folder.name)
        if known is not None:
            task = TaskConfig(**{**known.__dict__, "path": str(folder)})
        else:
            name, n = _task_name(folder), 2
            while name in {t.name for t in tasks}:
                name, n = f"{_task_name(folder)}_{n}", n + 1
            task = TaskConfig(name=name, path=str(folder))
        tasks.append(task)
    return tasks


def parse_set_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` flags -> {key: value}, each value read as YAML (numbers, lists, ...)."""
    import yaml

    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            changes[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return changes


def build_config(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(args.config) if args.config else TrainConfig()
    changes = {}
    for flag, key in (("data_root", "data_root"), ("model", "model"), ("steps", "steps"), ("batch_size", "batch_size"),
                      ("accum_steps", "accum_steps"), ("crop", "crop"), ("lr", "lr"), ("output", "output"),
                      ("cache_dir", "cache_dir"), ("device", "device"), ("amp", "amp"), ("workers", "workers"),
                      ("seed", "seed"), ("skip_bad_cases", "skip_bad_cases")):
        value = getattr(args, flag)
        if value is not None:
            changes[key] = tuple(value) if flag == "crop" else value
    if args.data:
        changes["tasks"] = tasks_from_folders(args.data, cfg.tasks)
    changes.update(parse_set_overrides(args.set))
    return cfg.replace(**changes) if changes else cfg


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``med3d train`` and ``python -m med3d_hub.train``; returns the exit status."""
    args = parser(prog).parse_args(argv)

    def run() -> int:
        from ..training.engine import train

        return train(build_config(args), resume=args.resume, quiet=args.quiet)

    return run_reporting_user_errors(run)


def run_reporting_user_errors(run: Callable[[], int]) -> int:
    """Run a training entry point: a user's error (errors.exit_code) is one line on rank 0 and its
    exit code; anything else is a bug and keeps its traceback."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - the error table decides
        if not is_user_error(err):
            raise
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"med3d: error: {err}", file=sys.stderr)
        return exit_code(err)
