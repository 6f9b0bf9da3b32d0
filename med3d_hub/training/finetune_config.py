"""The fine-tuning configurations: the base and the transfer section, with the segmentation or the
classification section (see ``config``).

- ``SegFinetuneConfig`` (``med3d finetune seg``): one MSD task folder in ``tasks`` and the
  ``decoder``: ``paper`` (3 x [transposed conv + conv] then a 1x1x1 conv, output at the input's
  size) or ``conv_seg`` (upstream MedicalNet's head, 1/4 of the input, upsampled).
- ``ClsFinetuneConfig`` (``med3d finetune cls``): a CSV of labelled volumes (``csv``,
  ``num_classes``, ``class_names``, ``class_weights``, ``intensity``, ``spacing``, ``drop_rate``).

A recipe's ``task`` key picks one; ``load_finetune_config`` reads either.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass

from .config import (
    PAPER_LR_PRETRAINED, PAPER_LR_SCRATCH, ClassificationSection, ConfigError, RunConfig, SegmentationSection,
    TransferSection, check_choice, read_config_file,
)

__all__ = ["ClsFinetuneConfig", "FinetuneConfig", "SegFinetuneConfig", "finetune_config_class", "load_finetune_config",
           "PAPER_LR_PRETRAINED", "PAPER_LR_SCRATCH"]


@dataclass
class FinetuneConfig(TransferSection, RunConfig):
    """What both fine-tuning configs share (the base and the transfer section); build one of the two."""

    def __post_init__(self) -> None:
        if type(self) is FinetuneConfig:
            raise TypeError("FinetuneConfig is the base of SegFinetuneConfig and ClsFinetuneConfig; build one of those")
        super().__post_init__()
        expected = "seg" if isinstance(self, SegmentationSection) else "cls"
        if self.task != expected:
            raise ConfigError(f"task is {self.task!r}, but this is a {type(self).run_name}; use "
                              f"`med3d finetune {self.task}` for a {self.task!r} recipe")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config", task: str | None = None) -> FinetuneConfig:
        """The dataclass of ``raw['task']`` (else ``task``, else ``seg``) when called on the base."""
        if cls is not FinetuneConfig:
            return super().from_dict(raw, where)
        chosen = finetune_config_class((raw.get("task") if isinstance(raw, dict) else None) or task or "seg")
        return chosen.from_dict(raw, where)


@dataclass
class SegFinetuneConfig(SegmentationSection, FinetuneConfig):
    """Segmentation fine-tuning: one MSD task folder, the encoder and a new decoder."""

    run_name: typing.ClassVar[str] = "segmentation fine-tuning (`med3d finetune seg`)"

    task: str = "seg"
    decoder: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.decoder, "decoder", ("paper", "conv_seg"))

    def check_runnable(self) -> None:
        if len(self.tasks) != 1:
            raise ConfigError(
                f"segmentation fine-tuning takes one MSD task folder (--data FOLDER), got {len(self.tasks)}"
            )


@dataclass
class ClsFinetuneConfig(ClassificationSection, FinetuneConfig):
    """Classification fine-tuning: labelled volumes, the encoder, pooling and a new linear classifier."""

    run_name: typing.ClassVar[str] = "classification fine-tuning (`med3d finetune cls`)"

    task: str = "cls"

    def check_runnable(self) -> None:
        if not self.csv:
            raise ConfigError("classification fine-tuning needs a label file: --csv FILE (columns path,label[,split])")


def finetune_config_class(task: str) -> type[FinetuneConfig]:
    """``seg`` -> ``SegFinetuneConfig``, ``cls`` -> ``ClsFinetuneConfig``."""
    check_choice(task, "task", ("seg", "cls"))
    return SegFinetuneConfig if task == "seg" else ClsFinetuneConfig


def load_finetune_config(path: str | os.PathLike, task: str | None = None) -> FinetuneConfig:
    """Read a fine-tuning recipe (a local YAML file or a packaged one such as ``configs/finetune-lits-liver.yaml``);
    its ``task`` key picks the dataclass, else ``task``."""
    raw, where = read_config_file(path)
    return FinetuneConfig.from_dict(raw, where=where, task=task)
