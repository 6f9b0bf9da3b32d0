"""Fine-tuning as a job of the co-training engine: same loop, DDP, AMP, checkpoints, resume and metrics.

``finetune(cfg)`` runs ``engine.train`` with the job of the config's task type: ``SegFinetuneJob``
or ``ClsFinetuneJob``, both a ``FinetuneJob``. What they share:

- the network: ``FinetuneNet`` (the encoder with ``cfg.pretrained`` loaded strictly, a new head);
- the optimiser: two named groups, ``encoder`` and ``new_layers``, both at ``lr``; the schedule
  multiplies each by its ``lr_scale`` (``new_layers_lr_mult`` for the new layers, 0 for an encoder
  frozen for ``freeze_epochs``), so the multiplier is applied once;
- the results: ``model.safetensors`` + ``config.json`` (a zoo model, which ``med3d publish``
  takes as a model folder, with ``training_config.yaml``, ``metrics.jsonl`` and ``curves.png``),
  and ``finetuned.safetensors`` (the whole network, for ``load_finetuned``).

By task type: segmentation keeps the co-training's data (one MSD task through its checks, cache
and crop sampling), its Dice + cross-entropy loss and sliding-window Dice per class;
classification reads a CSV of labelled volumes (``classification_data.py``), uses cross-entropy
with optional class weights, and reports accuracy, balanced accuracy and ROC AUC.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..weights.finetuned import FINETUNED_NAME, TRAINING_CONFIG_NAME as CONFIG_NAME
from .config import ConfigError
from .engine import Job, train
from .finetune_config import ClsFinetuneConfig, FinetuneConfig, SegFinetuneConfig

__all__ = ["FINETUNED_NAME", "ClsFinetuneJob", "FinetuneJob", "SegFinetuneJob", "finetune", "load_finetuned"]


class FinetuneJob(Job):
    """What both fine-tunings share: the starting weights, two learning rates, a frozen encoder, the results.

    The data, loss and validation come by task type: ``SegFinetuneJob`` keeps the co-training's
    (``Job``), ``ClsFinetuneJob`` has its own.
    """

    config_name = CONFIG_NAME
    resume_keys = ("task", "pretrained", "decoder", "csv", "num_classes", "class_weights", "intensity", "spacing",
                   "drop_rate")

    def __init__(self) -> None:
        self.freeze_steps = 0
        self.frozen: bool | None = None
        self.log = print
        self.device = torch.device("cpu")

    head = "a new head"  # for the log line

    # -- data ------------------------------------------------------------------------------------
    def prepare(self, cfg: FinetuneConfig, ctx, log) -> list:
        self.log, self.device = log, ctx.device
        tasks = self.prepare_data(cfg, ctx, log)
        task = tasks[0]
        if not task.val:
            log("note: no validation cases (val_fraction is 0 or there is a single case); no validation metrics")
        per_step = cfg.batch_size * cfg.accum_steps * ctx.world_size
        steps_per_epoch = max(1, math.ceil(len(task.train) / per_step))
        self.freeze_steps = cfg.freeze_epochs * steps_per_epoch
        weights = "random weights (from scratch)" if cfg.scratch else f"pretrained {cfg.pretrained}"
        new = "" if cfg.scratch else f", new layers x{cfg.new_layers_lr_mult:g}"
        frozen = f", encoder frozen for {self.freeze_steps} step(s)" if self.freeze_steps else ""
        log(f"fine-tune: {cfg.model} encoder ({weights}) + {self.head}; {cfg.optimizer} lr {cfg.lr:g}{new}{frozen}; "
            f"1 epoch = {steps_per_epoch} step(s)")
        return tasks

    def prepare_data(self, cfg: FinetuneConfig, ctx, log) -> list:
        return super().prepare(cfg, ctx, log)

    # -- network, loss, optimiser ----------------------------------------------------------------------
    def build_model(self, cfg: FinetuneConfig, tasks: list) -> nn.Module:
        from .finetune_model import build_finetune_net

        return build_finetune_net(cfg, tasks[0].num_classes)

    def optimizer(self, cfg: FinetuneConfig, model: nn.Module) -> torch.optim.Optimizer:
        groups = []
        for name, module, scale in (("encoder", model.encoder, 1.0), ("new_layers", model.head, _new_layers_scale(cfg))):
            params = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]  # biases and BatchNorm: no weight decay
            for part, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
                if part:  # the group's lr stays cfg.lr: the scheduler multiplies by lr_scale
                    groups.append({"params": part, "weight_decay": wd, "lr_scale": scale, "name": name})
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr)
        return torch.optim.Adam(groups, lr=cfg.lr)

    def before_step(self, cfg: FinetuneConfig, step: int, model: nn.Module, optimizer) -> None:
        if not self.freeze_steps:
            return
        frozen = step < self.freeze_steps
        if frozen != self.frozen:
            for group in optimizer.param_groups:
                if group.get("name") == "encoder":
                    group["lr_scale"] = 0.0 if frozen else 1.0
            if self.frozen is not None or not frozen:
                self.log(f"step {step}: the encoder is {'frozen' if frozen else 'trained from here on'}")
            self.frozen = frozen
        if frozen:  # BatchNorm statistics of a frozen encoder stay as loaded
            for m in model.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    # -- results ---------------------------------------------------------------------------------------
    def finish(self, cfg: FinetuneConfig, model: nn.Module, tasks: list, out: Path, metrics, log) -> None:
        from ..files import atomic_write
        from ..weights.model_files import file_state_dict, write_model_files
        from .finetune_model import to_zoo_model

        task = tasks[0]
        model = model.cpu() if next(model.parameters()).device.type != "cpu" else model
        meta = {"task": cfg.task, "num_classes": str(task.num_classes), "steps": str(cfg.steps),
                "class_names": ",".join(task.class_names)}
        with atomic_write(out / FINETUNED_NAME) as f:
            f.write(_safetensors_bytes(file_state_dict(model.state_dict()), meta))
        zoo = to_zoo_model(model)
        write_model_files(out, zoo, preprocess=_preprocess_of(cfg, task), class_names=task.class_names)
        self.plot(metrics)
        what = "the encoder only (the paper's decoder is not a zoo head; the whole network is in " \
               f"{FINETUNED_NAME})" if cfg.task == "seg" and cfg.decoder == "paper" else "encoder and head"
        log(f"done: {out / 'model.safetensors'} + config.json ({what}), {out / FINETUNED_NAME}, metrics "
            f"{metrics.path}, curves {metrics.png}; publish with `med3d publish {out} ...`")


class SegFinetuneJob(FinetuneJob):
    """Segmentation: the co-training's MSD data, Dice + cross-entropy loss and sliding-window Dice."""

    def prepare(self, cfg: SegFinetuneConfig, ctx, log) -> list:
        self.head = f"{cfg.decoder} decoder"
        return super().prepare(cfg, ctx, log)

    def validate(self, cfg: SegFinetuneConfig, model: nn.Module, tasks: list, ctx, autocast) -> tuple[dict, str]:
        scores, _ = super().validate(cfg, model, tasks, ctx, autocast)
        task = tasks[0]
        per_class = ", ".join(f"{name} {scores[f'dice/{task.name}/{name}']:.3f}"
                              for name in task.class_names[1:] if f"dice/{task.name}/{name}" in scores)
        return scores, f"Dice {scores.get('dice_mean', float('nan')):.3f} ({per_class})"


class ClsFinetuneJob(FinetuneJob):
    """Classification: a CSV of labelled volumes, cross-entropy (optionally weighted), accuracy and AUC."""

    head = "GAP + linear classifier"

    def prepare_data(self, cfg: ClsFinetuneConfig, ctx, log) -> list:
        from .classification_data import prepare_classification

        return prepare_classification(cfg, ctx, log)

    def dataset(self, cfg: ClsFinetuneConfig, tasks: list, plan):
        from .classification_data import LabelledVolumeDataset

        return LabelledVolumeDataset(tasks, plan, cfg.seed, cfg.augment)

    def loss_fn(self, cfg: ClsFinetuneConfig, tasks: list):
        weights = class_weights(cfg, tasks[0])
        if weights is not None:
            self.log(f"class weights of the cross-entropy: {[round(w, 4) for w in weights]}")
            return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=self.device))
        return nn.CrossEntropyLoss()

    def validate(self, cfg: ClsFinetuneConfig, model: nn.Module, tasks: list, ctx, autocast) -> tuple[dict, str]:
        from .classification_eval import validate_classification

        scores = validate_classification(model, tasks[0], ctx, batch_size=cfg.sw_batch_size, max_cases=cfg.val_max_cases,
                                         autocast=autocast, channels_last=cfg.channels_last)
        return scores, (f"accuracy {scores['accuracy']:.3f}, balanced accuracy {scores['balanced_accuracy']:.3f}, "
                        f"AUC {scores.get('auc', float('nan')):.3f}")


def _new_layers_scale(cfg: FinetuneConfig) -> float:
    """From scratch every layer is new, so all share ``lr``."""
    return 1.0 if cfg.scratch else float(cfg.new_layers_lr_mult)


def _safetensors_bytes(state: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    return save(state, metadata=meta)


def class_weights(cfg: ClsFinetuneConfig, task) -> list[float] | None:
    if cfg.class_weights is None:
        return None
    if cfg.class_weights == "balanced":
        counts = task.class_counts(task.train)
        total = sum(counts)
        return [total / (len(counts) * c) if c else 0.0 for c in counts]
    if len(cfg.class_weights) != task.num_classes:
        raise ConfigError(f"class_weights has {len(cfg.class_weights)} values; the data has {task.num_classes} classes")
    return [float(w) for w in cfg.class_weights]


def _preprocess_of(cfg: FinetuneConfig, task) -> dict:
    """What the fine-tuned weights expect as input, for config.json and the model card."""
    from ..data.preprocess import PAPER_PREPROCESS, Preprocess

    if cfg.task == "cls":
        return dict(task.preprocess)
    intensity = cfg.tasks[0].intensity or PAPER_PREPROCESS["intensity"]
    return Preprocess(spacing=task.spacing, intensity=intensity).to_dict()


def finetune(cfg: FinetuneConfig, resume: bool | str | None = None, quiet: bool = False) -> int:
    """Run (or continue) a fine-tuning; returns the process exit status (``quiet``: no progress lines)."""
    job = SegFinetuneJob() if isinstance(cfg, SegFinetuneConfig) else ClsFinetuneJob()
    return train(cfg, resume=resume, job=job, quiet=quiet)


def load_finetuned(run: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The whole fine-tuned network of a finished run (``finetuned.safetensors``), in eval mode."""
    from ..weights.finetuned import read_finetuned

    return read_finetuned(run).net.to(map_location).eval()
