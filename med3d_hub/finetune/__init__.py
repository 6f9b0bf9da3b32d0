"""Fine-tune a Med3D encoder on a new task: segmentation (MSD task) or classification (CSV of volumes).

    med3d finetune seg --data Task03_Liver --model resnet50 --pretrained 3dseg8 --output runs/liver
    med3d finetune cls --csv nodules.csv --model resnet34 --pretrained 3dseg8 --num-classes 2 --output runs/nodule
    torchrun --nproc_per_node=4 -m med3d_hub.finetune seg --config configs/finetune-lits-liver.yaml

One training engine (``med3d_hub.train``: loop, DDP, AMP, checkpoints, resume, metrics), two entry
points: ``FinetuneJob`` tells the engine what to train. Modules: ``config`` (the recipe), ``model``
(encoder + decoder or classifier), ``data`` (the CSV reader and its cache), ``evaluate``
(classification metrics, curves), ``job`` (the engine's hooks), ``cli``. See docs/transfer.md.
"""

from .config import FinetuneConfig, load_finetune_config

__all__ = ["FinetuneConfig", "finetune", "load_finetune_config", "load_finetuned", "main"]


def finetune(cfg, resume=None) -> int:
    """Run (or continue) a fine-tuning; returns the exit status (see ``job.finetune``)."""
    from .job import finetune as run

    return run(cfg, resume)


def load_finetuned(run, map_location="cpu"):
    """The whole fine-tuned network of a finished run, in eval mode (see ``job.load_finetuned``)."""
    from .job import load_finetuned as load

    return load(run, map_location)


def main(argv=None, prog=None) -> int:
    from .cli import main as cli_main

    return cli_main(argv, prog)
