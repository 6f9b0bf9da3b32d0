"""`python -m med3d_hub.finetune seg|cls`: the fine-tuning command.

The training code lives in med3d_hub.training; this package is only the entry point.
"""

from ..training.finetune_config import ClsFinetuneConfig, FinetuneConfig, SegFinetuneConfig, load_finetune_config

__all__ = ["ClsFinetuneConfig", "FinetuneConfig", "SegFinetuneConfig", "finetune", "load_finetune_config",
           "load_finetuned", "main"]


def finetune(cfg, resume=None) -> int:
    """Run (or continue) a fine-tuning; returns the exit status (see ``job.finetune``)."""
    from ..training.finetune import finetune as run

    return run(cfg, resume)


def load_finetuned(run, map_location="cpu"):
    """The whole fine-tuned network of a finished run, in eval mode (see ``job.load_finetuned``)."""
    from ..training.finetune import load_finetuned as load

    return load(run, map_location)


def main(argv=None, prog=None) -> int:
    from ..cli.finetune import main as cli_main

    return cli_main(argv, prog)
