"""The training loop: data, model, DDP, AMP, checkpoints, resume, logging, validation, export.

One optimiser step consumes ``world_size * accum_steps`` micro-batches of ``batch_size`` crops
(see ``sampling.MicroBatchPlan``). Every micro-batch is normalised by BatchNorm on its own, as in
plain data-parallel training. Gradients: each rank scales its micro-batch losses by
``1 / accum_steps`` and DDP averages over ranks, so the update is the mean over all micro-batches
of the step. BatchNorm running statistics are averaged over all micro-batches of the step
(``batchnorm.BatchNormAverager``). With these two rules, one process with ``accum_steps = N`` and N
processes with ``accum_steps = 1`` compute the same thing, up to floating-point summation order.

``train`` runs a ``Job`` (what is trained: the co-training by default, or a fine-tuning) through
``_Run``: its parts are the setup, the resume, one step, the progress record, validation and
checkpoints, each a method, in the order ``_Run.run`` calls them.
"""

from __future__ import annotations

import contextlib
import os
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import DivergedError
from ..files import atomic_write
from ..inference.runtime import autocast as runtime_autocast
from ..inference.runtime import check_amp
from .batchnorm import BatchNormAverager
from .checkpoint import (
    CheckpointError, check_resumable, choose_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
    tasks_digest,
)
from .config import RunConfig
from .data import prepare_tasks
from ..inference.distributed import DistContext, init_distributed
from .encoder import export_encoder
from .evaluate import validate
from .metrics import MetricsLogger
from .model import CoTrainNet
from .process import Printer, StopRequest, agree, lock_output, worker_init
from .sampling import CropDataset, MicroBatchPlan, MicroBatchSampler, collate
from .schedule import build_scheduler, learning_rates

__all__ = ["Job", "train"]

# What a parameter group's rate is made of; on resume these come from the config, not from the checkpoint.
_GROUP_SCHEDULE_KEYS = ("initial_lr", "lr_scale", "name")


class Job:
    """What ``train`` trains: the 3DSeg-8 co-training by default; ``med3d_hub.finetune`` passes its own.

    The loop, DDP, AMP, BatchNorm averaging, checkpoints, resume, metrics and signals stay in
    ``train``; a job supplies the data (tasks with ``index``, ``name``, ``weight``, ``train`` and
    ``val`` lists), the network (``forward(x, task_index) -> logits``, with an ``encoder``), the
    loss, the optimiser, the validation and what is written when the run ends.
    """

    config_name = "config.yaml"  # the run's settings, written into the output folder
    resume_keys: tuple[str, ...] = ()  # settings besides _RESUME_KEYS that a resumed run must keep

    def prepare(self, cfg, ctx: DistContext, log) -> list:
        return prepare_tasks(cfg, ctx, log)

    def build_model(self, cfg, tasks: list) -> nn.Module:
        return CoTrainNet(cfg.model, [t.name for t in tasks], [t.num_classes for t in tasks])

    def optimizer(self, cfg, model: nn.Module) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        opt_kwargs = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
        return create_optimizer_v2(model, opt="momentum" if cfg.optimizer == "sgd" else cfg.optimizer,
                                   lr=cfg.lr, weight_decay=cfg.weight_decay, **opt_kwargs)

    def loss_fn(self, cfg, tasks: list):
        from monai.losses import DiceCELoss

        return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def dataset(self, cfg, tasks: list, plan: MicroBatchPlan) -> torch.utils.data.Dataset:
        return CropDataset(tasks, plan, cfg.seed, cfg.foreground_prob, cfg.augment)

    def collate(self, samples: list[dict]) -> dict:
        return collate(samples)

    def before_step(self, cfg, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called before each optimiser step's learning rates are set (e.g. to freeze layers)."""

    def validate(self, cfg, model: nn.Module, tasks: list, ctx: DistContext, autocast) -> tuple[dict, str]:
        """The validation record's values and a one-line summary."""
        scores = validate(model, tasks, ctx, max_cases=cfg.val_max_cases, overlap=cfg.val_overlap,
                          sw_batch_size=cfg.sw_batch_size, autocast=autocast, channels_last=cfg.channels_last)
        shown = ", ".join(f"{t.name} {scores[f'dice/{t.name}']:.3f}" for t in tasks if f"dice/{t.name}" in scores)
        return scores, f"Dice {shown}"

    def plot(self, metrics: MetricsLogger) -> None:
        metrics.plot()

    def finish(self, cfg, model: nn.Module, tasks: list, out: Path, metrics: MetricsLogger, log) -> None:
        """Rank 0, after the last step: write the run's results."""
        path = export_encoder(model.state_dict(), cfg.model, out / "encoder.safetensors",
                              {"steps": cfg.steps, "tasks": ",".join(t.name for t in tasks)})
        self.plot(metrics)
        log(f"done: encoder {path}, metrics {metrics.path}, curves {metrics.png}")


def train(cfg: RunConfig, resume: bool | str | None = None, job: Job | None = None, quiet: bool = False) -> int:
    """Run (or continue) a co-training, or the training ``job`` describes; returns the exit status.

    ``quiet`` silences the progress lines; errors, ``metrics.jsonl`` and the checkpoints stay.
    """
    cfg.check_runnable()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ctx = init_distributed(cfg.device, cfg.dist_timeout_min, cfg.dist_backend)
    stop = StopRequest()
    stop.install()
    resources: list = []  # closed however the run ends: the output lock, the metrics files
    try:
        return _Run(cfg, ctx, job or Job(), Printer(ctx.is_main and not quiet), resources).run(resume, stop)
    finally:
        for resource in reversed(resources):
            resource.close()
        stop.restore()
        ctx.shutdown()


class _Run:
    """One run of ``train``, from its setup to its results; ``run`` calls the parts in order."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, job: Job, log: Printer, resources: list):
        self.cfg, self.ctx, self.job, self.log, self.resources = cfg, ctx, job, log, resources
        self.device = ctx.device
        self.out = Path(cfg.output)
        self.per_step = ctx.world_size * cfg.accum_steps
        self.amp_dtype = check_amp(cfg.amp, self.device)
        self.autocast = partial(runtime_autocast, self.device, self.amp_dtype)

    def run(self, resume: bool | str | None, stop: StopRequest) -> int:
        self.configure_torch()
        ckpt_path = agree(self.ctx, lambda: self.lock_and_choose(resume))
        self.build()
        start = self.resume_from(ckpt_path) if ckpt_path is not None else 0
        self.write_config()
        self.metrics = MetricsLogger(self.out, self.ctx.is_main, start)
        self.resources.append(self.metrics)
        status = self.loop(start, stop)
        if status == 0:
            if start == self.cfg.steps:
                self.log(f"the checkpoint is already at step {self.cfg.steps}; nothing left to train")
            if self.ctx.is_main:
                self.job.finish(self.cfg, self.model, self.tasks, self.out, self.metrics, self.log)
            self.ctx.barrier()
        return status

    # -- setup -------------------------------------------------------------------------------------
    def configure_torch(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
        self.log(f"run: {cfg.model}, {ctx.world_size} process(es) on {self.device.type}"
                 + (f" ({ctx.backend})" if ctx.initialised else "")
                 + f", {self.per_step} micro-batch(es) x {cfg.batch_size} crops per step, "
                 f"amp={self.amp_dtype or 'off'}, torch threads {torch.get_num_threads()}")

    def lock_and_choose(self, resume: bool | str | None) -> Path | None:
        """Rank 0: hold the output folder, and pick the checkpoint to resume from (None: a new run)."""
        self.resources.append(lock_output(self.out))
        return choose_checkpoint(self.out / "checkpoints", resume, self.log)

    def build(self) -> None:
        """The data, the network, the optimiser, its schedule and the gradient scaler."""
        cfg, job = self.cfg, self.job
        self.tasks = job.prepare(cfg, self.ctx, self.log)
        torch.manual_seed(cfg.seed)
        model = job.build_model(cfg, self.tasks)
        if cfg.grad_checkpointing:
            model.encoder.set_grad_checkpointing(True)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last_3d)
        self.model = model
        self.optimizer = job.optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def resume_from(self, path: Path) -> int:
        """Load the checkpoint on every rank; the step it was written at."""
        ctx = self.ctx
        try:
            state, readable = load_checkpoint(path), None
        except CheckpointError as err:
            state, readable = None, str(err)
        problems = [p for p in ctx.all_gather_object(readable) if p]
        if problems:
            raise CheckpointError(
                f"{problems[0]}\nEvery process must read the checkpoint: with several nodes, put --output on "
                "storage that all nodes share"
            )
        check_resumable(state, self.cfg, self.per_step, ctx.world_size, self.log, self.job.resume_keys)
        self.model.load_state_dict(state["model"])
        recipe = [{k: g[k] for k in _GROUP_SCHEDULE_KEYS if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, keys in zip(self.optimizer.param_groups, recipe):
            group.update(keys)  # the schedule follows the config (the checkpoint's "scheduler" is not read)
        self.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == ctx.world_size:
            set_rng_state(state["rng"][ctx.rank])
        if state["data"].get("tasks_digest") != tasks_digest(self.tasks):
            self.log("note: the training/validation cases differ from the checkpoint's; the data stream changes")
        self.log(f"resume: {path} (step {state['step']} of {self.cfg.steps})")
        return state["step"]

    def write_config(self) -> None:
        if self.ctx.is_main:
            import yaml

            with atomic_write(self.out / self.job.config_name, "w") as f:
                yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)

    def wrap(self) -> nn.Module:
        """The network as each step calls it: under DistributedDataParallel when there are several processes."""
        if not self.ctx.initialised:
            return self.model
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Buffers (BatchNorm statistics) are synchronised by BatchNormAverager, not by DDP's forward.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_buffer_sync,
        )

    def loader(self, start: int) -> torch.utils.data.DataLoader:
        cfg, plan = self.cfg, MicroBatchPlan([t.weight for t in self.tasks], self.cfg.seed, self.per_step)
        return torch.utils.data.DataLoader(
            self.job.dataset(cfg, self.tasks, plan),
            batch_sampler=MicroBatchSampler(plan, start, cfg.steps, self.ctx.rank, cfg.accum_steps, cfg.batch_size),
            num_workers=cfg.workers, collate_fn=self.job.collate, pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init, prefetch_factor=4 if cfg.workers else None,
        )

    # -- the loop ------------------------------------------------------------------------------------
    def loop(self, start: int, stop: StopRequest) -> int:
        """Steps ``start`` .. ``steps - 1``, with logging, validation and checkpoints; the exit status."""
        cfg, ctx = self.cfg, self.ctx
        self.ddp, self.loss_fn = self.wrap(), self.job.loss_fn(cfg, self.tasks)
        self.bn = BatchNormAverager(self.model, ctx, cfg.accum_steps)
        self.stats = torch.zeros(2 + 2 * len(self.tasks), dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        bar = self.progress_bar(start)
        self.restart_window()
        self.model.train()
        batches = iter(self.loader(start)) if start < cfg.steps else None
        status = 0
        for step in range(start, cfg.steps):
            self.step(step, batches)
            done = step + 1
            self.timed_steps += 1
            if bar is not None:
                bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                self.record_progress(done, bar)
            stop_now = torch.tensor([stop.signum], device=self.device)
            signum = int(ctx.all_reduce_max_(stop_now)) if ctx.initialised else stop.signum
            if done % cfg.val_every == 0 or done == cfg.steps:
                self.validate(done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or signum:
                self.checkpoint(done)
            if done % cfg.val_every == 0 or done % cfg.checkpoint_every == 0:
                self.restart_window()  # samples/s measures training only
            if signum:
                self.log(f"stopped by signal {signum} after step {done}; continue with --resume")
                status = 128 + signum
                break
        if bar is not None:
            bar.close()
            self.log.bar = None
        return status

    def progress_bar(self, start: int):
        if not self.ctx.is_main or start >= self.cfg.steps:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=None)
        if bar.disable:
            return None
        self.log.bar = bar
        return bar

    def step(self, step: int, batches) -> None:
        """One optimiser step: ``accum_steps`` micro-batches on this rank, then the update."""
        cfg, ctx, n_tasks = self.cfg, self.ctx, len(self.tasks)
        self.job.before_step(cfg, step, self.model, self.optimizer)
        self.scheduler.step_update(step)
        self.bn.begin()
        for i in range(cfg.accum_steps):
            batch = next(batches)
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True).long()
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            task = batch["task"]
            self.bn.before(i)
            last = i == cfg.accum_steps - 1
            with (self.ddp.no_sync() if ctx.initialised and not last else contextlib.nullcontext()):
                with self.autocast():
                    logits = self.ddp(x, task)
                loss = self.loss_fn(logits.float(), y)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            self.bn.after()
            value = loss.detach().double()
            self.stats[0] += value
            self.stats[1] += 1
            self.stats[2 + task] += value
            self.stats[2 + n_tasks + task] += 1
        self.bn.finish()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def restart_window(self) -> None:
        """Start a new averaging window for the logged loss and speed."""
        self.window_start, self.timed_steps = time.perf_counter(), 0

    def record_progress(self, done: int, bar) -> None:
        """The ``train`` record of the steps since the last one (all ranks); a NaN loss stops the run."""
        cfg, n_tasks = self.cfg, len(self.tasks)
        totals = self.ctx.all_reduce_sum_(self.stats.clone()).cpu()
        elapsed = time.perf_counter() - self.window_start
        record = {"kind": "train", "step": done, "loss": round(float(totals[0] / totals[1]), 6)}
        for t in self.tasks:
            count = float(totals[2 + n_tasks + t.index])
            if count:
                record[f"loss/{t.name}"] = round(float(totals[2 + t.index]) / count, 6)
        record.update(learning_rates(self.optimizer))  # the rates this step used
        if self.timed_steps:
            record["samples_per_s"] = round(self.timed_steps * self.per_step * cfg.batch_size / elapsed, 3)
        if cfg.grad_clip:
            record["grad_norm"] = round(float(self.grad_norm), 4)
        if not torch.isfinite(totals[0]):
            raise DivergedError(f"the training loss is {record['loss']} at step {done}; lower --lr or set grad_clip")
        self.metrics.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record.get('samples_per_s', 0):.2f}")
        else:
            self.log(f"step {done}/{cfg.steps} loss {record['loss']:.4f} lr {record['lr']:.3g} "
                     f"{record.get('samples_per_s', 0):.2f} samples/s")
        self.stats.zero_()
        self.restart_window()

    def validate(self, step: int) -> None:
        if not any(t.val for t in self.tasks):
            return
        begin = time.perf_counter()
        scores, summary = self.job.validate(self.cfg, self.model, self.tasks, self.ctx,
                                            self.autocast if self.amp_dtype else None)
        self.metrics.log({"kind": "val", "step": step, **scores})
        self.job.plot(self.metrics)
        self.log(f"validation at step {step}: {summary} ({time.perf_counter() - begin:.0f} s)")

    def checkpoint(self, step: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        rngs = ctx.all_gather_object(rng_state())
        if ctx.is_main:
            path = save_checkpoint(self.out / "checkpoints", step, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                "data": {"step": step, "micro_batches_per_step": self.per_step, "batch_size": cfg.batch_size,
                         "seed": cfg.seed, "tasks_digest": tasks_digest(self.tasks)},
                "config": cfg.to_dict(), "tasks": [t.name for t in self.tasks], "world_size": ctx.world_size,
            }, keep=cfg.keep_checkpoints)
            self.log(f"checkpoint: {path}")
