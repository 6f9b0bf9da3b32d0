"""Command line of the fine-tuning: ``med3d finetune seg|cls`` and ``python -m med3d_hub.finetune seg|cls``.

A recipe file (``--config``, e.g. the packaged ``configs/finetune-lits-liver.yaml``) gives the run;
flags override single settings. ``--pretrained none`` gives the from-scratch baseline with the same
recipe (its learning rate becomes the paper's 1e-2 unless ``--lr`` is given).
"""

from __future__ import annotations

import argparse

from .train import AMP_HELP

__all__ = ["add_arguments", "build_config", "main", "parser", "run"]

EPILOG = {
    "seg": """\
examples:
  med3d finetune seg --data Task03_Liver --model resnet50 --pretrained 3dseg8 --output runs/liver
  med3d finetune seg --data Task03_Liver --model resnet50 --pretrained none --output runs/liver-scratch
  med3d finetune seg --config configs/finetune-lits-liver.yaml --data-root /data/msd --output runs/lits
  med3d compare runs/liver runs/liver-scratch
""",
    "cls": """\
examples:
  med3d finetune cls --csv nodules.csv --model resnet34 --pretrained 3dseg8 --num-classes 2 --output runs/nodule
  med3d finetune cls --config configs/finetune-lidc-nodule.yaml --csv nodules.csv --output runs/nodule

nodules.csv: a header, then one row per volume: path,label[,split] (NIfTI, DICOM folder or .npy;
relative paths from the CSV's folder; split is train, val, test or empty).
""",
}


def add_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    """The options of ``finetune seg`` or ``finetune cls``."""
    g = p.add_argument_group("data")
    g.add_argument("--config", help="recipe YAML (a local file, or a packaged one such as configs/finetune-lung.yaml)")
    if kind == "seg":
        g.add_argument("--data", metavar="FOLDER", help="the MSD task folder (dataset.json, imagesTr/, labelsTr/)")
        g.add_argument("--data-root", help="folder that a recipe's relative task path is taken from")
    else:
        g.add_argument("--csv", metavar="FILE", help="volumes and labels: columns path,label[,split]")
        g.add_argument("--class-weights", metavar="balanced|W0,W1,...",
                       help="cross-entropy class weights: 'balanced' (inverse class frequency) or one per class")
    g.add_argument("--num-classes", type=int, help="classes, background included for segmentation (default: from the data)")
    g.add_argument("--cache-dir", help="where preprocessed volumes are cached")
    g.add_argument("--skip-bad-cases", action="store_true", default=None,
                   help="warn about unusable cases (rows) and train without them instead of stopping")
    g = p.add_argument_group("model and recipe")
    g.add_argument("--model", help="encoder: resnet10, resnet18, resnet34, resnet50, resnet101, resnet152, resnet200")
    g.add_argument("--pretrained", metavar="WEIGHTS",
                   help="the encoder's weights: a tag (3dseg8, 23datasets), 'default', a local .pth/.safetensors file "
                        "(e.g. a co-training run's encoder.safetensors), hf://org/repo@rev/file, or 'none' (from scratch)")
    if kind == "seg":
        g.add_argument("--decoder", choices=("paper", "conv_seg"),
                       help="paper: 3 x (transposed conv + conv) + 1x1x1 conv (default); conv_seg: upstream MedicalNet's head")
    g.add_argument("--lr", type=float, help="encoder learning rate (default: 1e-3 pretrained, 1e-2 from scratch)")
    g.add_argument("--new-layers-lr-mult", type=float, metavar="X",
                   help="new layers learn X times faster than a pretrained encoder (default 10)")
    g.add_argument("--freeze-epochs", type=int, metavar="N", help="keep the encoder fixed for the first N epochs")
    g.add_argument("--steps", type=int, help="optimiser steps in total")
    g.add_argument("--batch-size", type=int, help="samples per micro-batch (per process and accumulation step)")
    g.add_argument("--accum-steps", type=int, help="micro-batches accumulated per process and step")
    g.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="training crop (seg) or network input size (cls) in voxels")
    g.add_argument("--val-every", type=int, metavar="STEPS", help="validate every STEPS steps")
    g = p.add_argument_group("run")
    g.add_argument("--output", help="run folder: checkpoints, metrics, curves, the fine-tuned model")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], help=AMP_HELP)
    g.add_argument("--workers", type=int, help="data loader worker processes per training process")
    g.add_argument("--seed", type=int)
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --output (or from CHECKPOINT)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set weight_decay=1e-4 --set schedule=cosine")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m med3d_hub.finetune",
                                description="Fine-tune a Med3D encoder (segmentation or classification).")
    sub = p.add_subparsers(dest="kind", metavar="seg|cls", required=True)
    for kind, text in (("seg", "segmentation of an MSD task"), ("cls", "classification of labelled volumes")):
        q = sub.add_parser(kind, help=text, description=f"Fine-tune a Med3D encoder: {text}.", epilog=EPILOG[kind],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(q, kind)
        q.add_argument("-q", "--quiet", action="store_true", help="no progress lines (errors, metrics and checkpoints stay)")
    return p


def build_config(args: argparse.Namespace):
    from ..training.config import ConfigError
    from ..training.finetune_config import finetune_config_class, load_finetune_config
    from .train import parse_set_overrides

    kind = args.kind
    cfg = load_finetune_config(args.config, task=kind) if args.config else finetune_config_class(kind)()
    if cfg.task != kind:
        raise ConfigError(f"{args.config} is a {cfg.task!r} recipe; run it with `finetune {cfg.task}`")
    changes: dict = {}
    flags = ("data_root", "model", "pretrained", "decoder", "lr", "new_layers_lr_mult", "freeze_epochs", "steps",
             "batch_size", "accum_steps", "crop", "val_every", "output", "cache_dir", "device", "amp", "workers",
             "seed", "skip_bad_cases", "csv")
    for key in flags:
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = tuple(value) if key == "crop" else value
    if getattr(args, "class_weights", None):
        text = args.class_weights.strip()
        try:
            changes["class_weights"] = "balanced" if text == "balanced" else [float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"--class-weights {text!r}: expected 'balanced' or numbers such as 1,3") from None
    if args.num_classes is not None:
        if kind == "cls":
            changes["num_classes"] = args.num_classes
    if kind == "seg" and args.data:
        from .train import tasks_from_folders

        changes["tasks"] = tasks_from_folders([args.data], cfg.tasks)
    changes.update(parse_set_overrides(args.set))
    if "checkpoint_every" not in changes and "val_every" in changes and not args.config:
        changes["checkpoint_every"] = changes["val_every"]
    cfg = cfg.replace(**changes) if changes else cfg
    if kind == "seg" and args.num_classes is not None and cfg.tasks:
        from ..training.config import TaskConfig

        cfg = cfg.replace(tasks=[TaskConfig(**{**cfg.tasks[0].__dict__, "num_classes": args.num_classes})])
    return cfg


def run(args: argparse.Namespace) -> int:
    """Build the config from parsed arguments and train; errors propagate (the caller reports them)."""
    from ..training.finetune import finetune

    cfg = build_config(args)
    return finetune(cfg, resume=args.resume, quiet=getattr(args, "quiet", False))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``python -m med3d_hub.finetune``; returns the exit status."""
    from .train import run_reporting_user_errors

    args = parser(prog).parse_args(argv)
    return run_reporting_user_errors(lambda: run(args))
