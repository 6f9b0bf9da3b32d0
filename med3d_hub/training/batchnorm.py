"""BatchNorm running statistics averaged over the micro-batches of an optimiser step.

Every micro-batch of a step starts from the same running statistics, and their updated values
are averaged over all micro-batches (all ranks) at the end of the step, so that one process with
``accum_steps = N`` and N processes with ``accum_steps = 1`` end the step with the same statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..inference.distributed import DistContext

__all__ = ["BatchNormAverager"]


class BatchNormAverager:
    """Running statistics averaged over the micro-batches of a step (see the module docstring)."""

    def __init__(self, model: nn.Module, ctx: DistContext, accum_steps: int):
        self.ctx, self.accum = ctx, accum_steps
        self.stats, self.counters = [], []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                self.stats += [m.running_mean, m.running_var]
                self.counters.append(m.num_batches_tracked)
        self.active = bool(self.stats) and (accum_steps > 1 or ctx.world_size > 1)

    def _flat(self) -> torch.Tensor:
        return torch.cat([s.reshape(-1).float() for s in self.stats])

    def _assign(self, flat: torch.Tensor) -> None:
        offset = 0
        for s in self.stats:
            n = s.numel()
            s.copy_(flat[offset: offset + n].view_as(s))
            offset += n

    @torch.no_grad()
    def begin(self) -> None:
        if self.active:
            self.start = self._flat()
            self.start_counts = [c.clone() for c in self.counters]
            self.sum = torch.zeros_like(self.start)

    @torch.no_grad()
    def before(self, i: int) -> None:
        if self.active and i > 0:
            self._assign(self.start)
            for c, c0 in zip(self.counters, self.start_counts):
                c.copy_(c0)

    @torch.no_grad()
    def after(self) -> None:
        if self.active:
            self.sum += self._flat()

    @torch.no_grad()
    def finish(self) -> None:
        if self.active:
            mean = self.ctx.all_reduce_sum_(self.sum) / (self.accum * self.ctx.world_size)
            self._assign(mean)
