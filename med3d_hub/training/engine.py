"""The training loop: data, model, DDP, AMP, checkpoints, resume, logging, validation, export.

One optimiser step consumes ``world_size * accum_steps`` micro-batches of ``batch_size`` crops
(see ``data.MicroBatchPlan``). Every micro-batch is normalised by BatchNorm on its own, as in
plain data-parallel training. Gradients: each rank scales its micro-batch losses by
``1 / accum_steps`` and DDP averages over ranks, so the update is the mean over all micro-batches
of the step. BatchNorm running statistics: every micro-batch of a step starts from the same
running statistics, and their updated values are averaged over all micro-batches (all ranks) at
the end of the step. With these two rules, one process with ``accum_steps = N`` and N processes
with ``accum_steps = 1`` compute the same thing, up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import DivergedError
from ..files import atomic_write
from ..inference.runtime import autocast as runtime_autocast
from ..inference.runtime import check_amp
from .checkpoint import CheckpointError, find_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, RunConfig
from .data import PreparedTask, prepare_tasks
from .distributed import DistContext, init_distributed
from .encoder import export_encoder
from .evaluate import validate
from .metrics import MetricsLogger
from .model import CoTrainNet
from .sampling import CropDataset, MicroBatchPlan, MicroBatchSampler, collate

__all__ = ["Job", "train"]

# Settings a resumed run must share with its checkpoint (the rest may change, e.g. steps).
_RESUME_KEYS = ("model", "batch_size", "crop", "foreground_prob", "augment", "seed", "optimizer", "momentum",
                "weight_decay", "val_fraction")
# Settings of the learning-rate schedule: when one changes, the schedule is rebuilt from the config.
_SCHEDULE_KEYS = ("steps", "lr", "schedule", "warmup_steps", "warmup_lr", "min_lr", "poly_power")
_TASK_KEYS = ("name", "num_classes", "channel", "weight", "crop", "intensity")
# What a parameter group's rate is made of; on resume these come from the config, not from the checkpoint.
_GROUP_SCHEDULE_KEYS = ("initial_lr", "lr_scale", "name")


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


class _Printer:
    """Rank-0 console output that cooperates with the progress bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)


class _StopRequest:
    """SIGTERM / SIGINT ask for a checkpoint at the end of the current step, then a clean exit."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def install(self) -> None:
        if not _in_main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: stop now
            self.restore()
            signal.raise_signal(signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _worker_init(worker_id: int) -> None:
    """Loader workers take the default signal handling back (they are forked from the trainer)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _BatchNormAverager:
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


def _tasks_digest(tasks: list[PreparedTask]) -> str:
    payload = [[t.name, t.train, t.val] for t in tasks]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _check_resumable(state: dict, cfg: RunConfig, per_step: int, world: int, log, extra_keys=()) -> None:
    """Raise if the run cannot continue; note the settings that changed."""
    old, new = state["config"], cfg.to_dict()
    keys = [k for k in (*_RESUME_KEYS, *extra_keys) if k in new]  # a key of another task's section is not compared
    diffs = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys if old.get(k) != new[k]]
    old_tasks = [{k: t.get(k) for k in _TASK_KEYS} for t in old.get("tasks", [])]
    new_tasks = [{k: t.get(k) for k in _TASK_KEYS} for t in new.get("tasks", [])]
    if old_tasks != new_tasks:
        diffs.append(f"tasks: {old_tasks} -> {new_tasks}")
    old_per_step = state["data"]["micro_batches_per_step"]
    if old_per_step != per_step:
        hint = (f"; with {world} process(es) use --accum-steps {old_per_step // world}"
                if old_per_step % world == 0 else "")
        diffs.append(f"micro-batches per step (processes x accum_steps): {old_per_step} -> {per_step}{hint}")
    if diffs:
        raise CheckpointError(
            "the checkpoint was made with other settings, so resuming would not continue the same run:\n  "
            + "\n  ".join(diffs) + "\nStart a new run in another --output folder, or restore these settings."
        )
    for key in ("grad_clip", "amp", "accum_steps"):
        if old.get(key) != new[key]:
            log(f"note: {key} changed since the checkpoint ({old.get(key)!r} -> {new[key]!r})")
    changed = [key for key in _SCHEDULE_KEYS if old.get(key) != new[key]]
    for key in changed:
        log(f"note: {key} changed since the checkpoint ({old.get(key)!r} -> {new[key]!r}); "
            "the learning-rate schedule follows the new value from here on")


def _choose_checkpoint(folder: Path, resume: bool | str | None, log) -> Path | None:
    """Which checkpoint to resume from (rank 0), or None to start a new run."""
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: no such checkpoint file")
        return path
    found = find_checkpoints(folder)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if not found:
        if resume:
            log(f"resume: no checkpoint in {folder}; starting a new run")
        return None
    if not resume and not restarted:
        raise CheckpointError(
            f"{folder} already holds checkpoints (latest: {found[-1][1].name}); pass --resume to continue "
            "that run, or choose another --output folder"
        )
    for step, path in reversed(found):  # the newest readable one (writes are atomic; this is belt and braces)
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as err:
            log(f"warning: {err}; trying an older checkpoint")
    raise CheckpointError(f"no readable checkpoint in {folder}")


def _lock_output(out: Path):
    """Hold ``out/.lock`` for the life of this process: two runs must not write one folder.

    A POSIX record lock (``lockf``): it belongs to this process only, so the data loader's forked
    workers do not keep it alive after this process ends, and the OS drops it on any exit.
    """
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return handle
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CheckpointError(
            f"another training process is using {out} (it holds {out / '.lock'}); wait for it to end, "
            "or choose another --output folder"
        ) from None
    return handle


def _agree(ctx: DistContext, fn):
    """Run ``fn`` on rank 0 and hand its result, or its error, to every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except (CheckpointError, ConfigError, OSError) as err:
            error = f"{type(err).__name__}: {err}" if isinstance(err, OSError) else str(err)
    result, error = ctx.broadcast_object((result, error))
    if error:
        raise CheckpointError(error)
    return result


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
    stop = _StopRequest()
    stop.install()
    resources: list = []  # closed however the run ends: the output lock, the metrics files
    try:
        return _train(cfg, ctx, resume, stop, resources, job or Job(), quiet)
    finally:
        for resource in reversed(resources):
            resource.close()
        stop.restore()
        ctx.shutdown()


def _train(cfg: RunConfig, ctx: DistContext, resume, stop: _StopRequest, resources: list, job: Job,
           quiet: bool) -> int:
    log = _Printer(ctx.is_main and not quiet)
    device = ctx.device
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    per_step = ctx.world_size * cfg.accum_steps
    amp_dtype = check_amp(cfg.amp, device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    log(f"run: {cfg.model}, {ctx.world_size} process(es) on {device.type}"
        + (f" ({ctx.backend})" if ctx.initialised else "")
        + f", {per_step} micro-batch(es) x {cfg.batch_size} crops per step, amp={amp_dtype or 'off'}, "
        f"torch threads {torch.get_num_threads()}")

    def lock_and_choose():
        resources.append(_lock_output(out))
        return _choose_checkpoint(ckpt_dir, resume, log)

    ckpt_path = _agree(ctx, lock_and_choose)
    tasks = job.prepare(cfg, ctx, log)
    names = [t.name for t in tasks]

    torch.manual_seed(cfg.seed)
    model = job.build_model(cfg, tasks)
    if cfg.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)

    optimizer = job.optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start = 0
    if ckpt_path is not None:
        try:
            state = load_checkpoint(ckpt_path)
            readable = None
        except CheckpointError as err:
            state, readable = None, str(err)
        problems = [p for p in ctx.all_gather_object(readable) if p]
        if problems:
            raise CheckpointError(
                f"{problems[0]}\nEvery process must read the checkpoint: with several nodes, put --output on "
                "storage that all nodes share"
            )
        _check_resumable(state, cfg, per_step, ctx.world_size, log, job.resume_keys)
        model.load_state_dict(state["model"])
        recipe = [{k: g[k] for k in _GROUP_SCHEDULE_KEYS if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, keys in zip(optimizer.param_groups, recipe):
            group.update(keys)  # the schedule follows the config (the checkpoint's "scheduler" is not read)
        scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == ctx.world_size:
            set_rng_state(state["rng"][ctx.rank])
        if state["data"].get("tasks_digest") != _tasks_digest(tasks):
            log("note: the training/validation cases differ from the checkpoint's; the data stream changes")
        start = state["step"]
        log(f"resume: {ckpt_path} (step {start} of {cfg.steps})")
        del state

    if ctx.is_main:
        import yaml

        with atomic_write(out / job.config_name, "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    metrics = MetricsLogger(out, ctx.is_main, start)
    resources.append(metrics)

    ddp = model
    if ctx.initialised:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (BatchNorm statistics) are synchronised by _BatchNormAverager, not by DDP's forward.
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync,
        )

    loss_fn = job.loss_fn(cfg, tasks)
    bn = _BatchNormAverager(model, ctx, cfg.accum_steps)
    plan = MicroBatchPlan([t.weight for t in tasks], cfg.seed, per_step)
    loader = torch.utils.data.DataLoader(
        job.dataset(cfg, tasks, plan),
        batch_sampler=MicroBatchSampler(plan, start, cfg.steps, ctx.rank, cfg.accum_steps, cfg.batch_size),
        num_workers=cfg.workers, collate_fn=job.collate, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
        prefetch_factor=4 if cfg.workers else None,
    )
    autocast = partial(runtime_autocast, device, amp_dtype)

    def checkpoint(step: int) -> None:
        rngs = ctx.all_gather_object(rng_state())
        if ctx.is_main:
            path = save_checkpoint(ckpt_dir, step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                "data": {"step": step, "micro_batches_per_step": per_step, "batch_size": cfg.batch_size,
                         "seed": cfg.seed, "tasks_digest": _tasks_digest(tasks)},
                "config": cfg.to_dict(), "tasks": names, "world_size": ctx.world_size,
            }, keep=cfg.keep_checkpoints)
            log(f"checkpoint: {path}")

    def run_validation(step: int) -> None:
        if not any(t.val for t in tasks):
            return
        begin = time.perf_counter()
        scores, summary = job.validate(cfg, model, tasks, ctx, autocast if amp_dtype else None)
        metrics.log({"kind": "val", "step": step, **scores})
        job.plot(metrics)
        log(f"validation at step {step}: {summary} ({time.perf_counter() - begin:.0f} s)")

    n_tasks = len(tasks)
    stats = torch.zeros(2 + 2 * n_tasks, dtype=torch.float64, device=device)
    grad_norm = torch.zeros((), device=device)
    bar = None
    if ctx.is_main and start < cfg.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=None)
        if bar.disable:
            bar = None
        log.bar = bar
    window_start, timed_steps = time.perf_counter(), 0
    status, step = 0, start
    model.train()
    batches = iter(loader) if start < cfg.steps else None
    for step in range(start, cfg.steps):
        job.before_step(cfg, step, model, optimizer)
        scheduler.step_update(step)
        bn.begin()
        for i in range(cfg.accum_steps):
            batch = next(batches)
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True).long()
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            task = batch["task"]
            bn.before(i)
            last = i == cfg.accum_steps - 1
            with (ddp.no_sync() if ctx.initialised and not last else contextlib.nullcontext()):
                with autocast():
                    logits = ddp(x, task)
                loss = loss_fn(logits.float(), y)
                scaler.scale(loss / cfg.accum_steps).backward()
            bn.after()
            value = loss.detach().double()
            stats[0] += value
            stats[1] += 1
            stats[2 + task] += value
            stats[2 + n_tasks + task] += 1
        bn.finish()
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        if cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        timed_steps += 1
        if bar is not None:
            bar.update(1)

        if done % cfg.log_every == 0 or done == cfg.steps:
            totals = ctx.all_reduce_sum_(stats.clone()).cpu()
            elapsed = time.perf_counter() - window_start
            record = {"kind": "train", "step": done, "loss": round(float(totals[0] / totals[1]), 6)}
            for t in tasks:
                count = float(totals[2 + n_tasks + t.index])
                if count:
                    record[f"loss/{t.name}"] = round(float(totals[2 + t.index]) / count, 6)
            record.update(learning_rates(optimizer))  # the rates this step used
            if timed_steps:
                record["samples_per_s"] = round(timed_steps * per_step * cfg.batch_size / elapsed, 3)
            if cfg.grad_clip:
                record["grad_norm"] = round(float(grad_norm), 4)
            if not torch.isfinite(totals[0]):
                raise DivergedError(
                    f"the training loss is {record['loss']} at step {done}; lower --lr or set grad_clip"
                )
            metrics.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record.get('samples_per_s', 0):.2f}")
            else:
                log(f"step {done}/{cfg.steps} loss {record['loss']:.4f} lr {record['lr']:.3g} "
                    f"{record.get('samples_per_s', 0):.2f} samples/s")
            stats.zero_()
            window_start, timed_steps = time.perf_counter(), 0

        stop_now = torch.tensor([stop.signum], device=device)
        signum = int(ctx.all_reduce_max_(stop_now)) if ctx.initialised else stop.signum
        if done % cfg.val_every == 0 or done == cfg.steps:
            run_validation(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or signum:
            checkpoint(done)
        if done % cfg.val_every == 0 or done % cfg.checkpoint_every == 0:
            window_start, timed_steps = time.perf_counter(), 0  # samples/s measures training only
        if signum:
            log(f"stopped by signal {signum} after step {done}; continue with --resume")
            status = 128 + signum
            break
    if bar is not None:
        bar.close()
        log.bar = None

    if status == 0:
        if start == cfg.steps:
            log(f"the checkpoint is already at step {cfg.steps}; nothing left to train")
        if ctx.is_main:
            job.finish(cfg, model, tasks, out, metrics, log)
        ctx.barrier()
    return status
