"""The learning-rate schedule of every training run (timm's), and the rates an optimiser applies now."""

from __future__ import annotations

import torch

__all__ = ["build_scheduler", "learning_rates"]


def build_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """timm's schedule, stepped per optimiser step: ``warmup_steps`` of linear warm-up, then the decay
    over the remaining steps. Every group's rate is the schedule's rate times its ``lr_scale`` (1 when
    absent): timm multiplies by it, so a group's own ``lr`` must stay ``cfg.lr``.

    ``constant`` is timm's step schedule with no decay (timm before 1.0.29 has no ``constant``).
    """
    from timm.scheduler import create_scheduler_v2

    sched, decay = (("step", 1.0) if cfg.schedule == "constant" else (cfg.schedule, cfg.poly_power))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=max(1, cfg.steps - cfg.warmup_steps), decay_epochs=1, decay_rate=decay,
        warmup_epochs=cfg.warmup_steps, warmup_lr=cfg.warmup_lr, warmup_prefix=True, min_lr=cfg.min_lr,
        step_on_epochs=False, updates_per_epoch=1,
    )
    return scheduler


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The rates the optimiser applies now: ``lr``, the schedule's rate (what a group of ``lr_scale`` 1
    gets), and ``lr/<name>`` for each named group (fine-tuning: ``encoder``, ``new_layers``)."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        if "lr" not in rates and scale:
            rates["lr"] = float(group["lr"]) / scale
        if "name" in group:
            rates.setdefault(f"lr/{group['name']}", float(group["lr"]))
    rates.setdefault("lr", 0.0)
    return {"lr": rates.pop("lr"), **rates}
