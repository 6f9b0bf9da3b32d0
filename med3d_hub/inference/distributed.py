"""The process group: one place that knows whether we run alone or under torchrun (training and inference).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; then the group is initialised with
NCCL on GPUs and gloo on CPUs. NCCL refuses two processes on one GPU, so when a node runs more
processes than it has GPUs (``LOCAL_WORLD_SIZE``), ``auto`` takes gloo there too (gloo reduces
CUDA tensors through host memory: slower, but it runs). A plain ``python -m med3d_hub.train``
(or ``med3d features``) runs as a group of one without initialising anything, and every collective
below is then a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UsageError
from .runtime import resolve_device

__all__ = ["DistContext", "init_distributed", "pick_backend"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.initialised else None

    def barrier(self) -> None:
        if self.initialised:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (our own objects, never data read from files)."""
        if not self.initialised:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.initialised:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.initialised:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.initialised:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def shutdown(self) -> None:
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()
        self.initialised = False


def pick_backend(preference: str, device: torch.device, local_world_size: int) -> str:
    """``auto``: NCCL when every process of the node has a GPU of its own, else gloo."""
    if preference == "nccl" and device.type != "cuda":
        raise UsageError("dist_backend nccl needs GPUs; use dist_backend: gloo (or auto) on CPUs")
    if preference != "auto":
        return preference
    if device.type == "cuda" and local_world_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def init_distributed(device: str = "auto", timeout_min: float = 60.0, backend: str = "auto") -> DistContext:
    """Join the torchrun process group if there is one; pick this process's device and the backend."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if launched:
        backend = pick_backend(backend, dev, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        timeout = datetime.timedelta(minutes=timeout_min)
        # torchrun's agent keeps one key-value store across worker restarts, and the previous
        # attempt's connection keys are still in it; a new attempt that read them would dial
        # dead processes. Each attempt therefore uses its own key prefix.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend, store=dist.PrefixStore(f"med3d_hub/attempt_{attempt}", store),
            rank=rank, world_size=world, timeout=timeout, **kwargs,
        )
        ctx.initialised = True
    return ctx
