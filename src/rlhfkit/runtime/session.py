"""The part of a training run every gradient recipe sets up the same way: run folder, optimizer and
schedule, mixed precision, resume, DDP wrapping, logging and checkpoint cadence.

Recipes keep their own explicit loops (forward, loss, backward); they open a `Session` before it and
call `session.end_step(...)` after each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhfkit.data.sampler import BatchSampler
from rlhfkit.runtime.distributed import DistInfo, print0
from rlhfkit.runtime.loop import (
    TrainConfig,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    prepare_run_dir,
    restore_training_state,
    save_training_state,
    total_steps,
)
from rlhfkit.runtime.metrics import MetricsLogger, ProgressBar


@dataclass
class Session:
    run_dir: Path
    steps: int
    """Total optimizer steps of the run."""
    start: int
    """Last step already done (0 for a new run, the checkpoint's step on resume)."""
    finished: bool
    """Resumed a run that had already ended: nothing left to do."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    amp: torch.dtype | None
    ddp: torch.nn.Module
    """The model to call in the loop (DDP-wrapped under torchrun)."""
    logger: MetricsLogger
    train: TrainConfig
    info: DistInfo
    state: dict[str, Any]
    """The restored checkpoint's state.json (empty for a new run): recipes keep running statistics here."""

    def progress(self, enabled: bool, description: str) -> ProgressBar:
        return ProgressBar(self.steps, enabled=self.info.is_main and enabled, start=self.start, description=description)

    def should_eval(self, step: int) -> bool:
        """Periodic eval inside the run (the recipe evaluates before and after the loop itself)."""
        return bool(self.train.eval_every) and step % self.train.eval_every == 0 and step != self.steps

    def end_step(self, step: int, *, model: torch.nn.Module, sampler: BatchSampler, metrics: dict[str, float],
                 extra_state: dict[str, Any] | None = None) -> None:
        """Log this step's metrics (every log_every steps) and checkpoint (every save_every, and last)."""
        if step % self.train.log_every == 0 or step == self.steps:
            epoch = sampler.epoch + sampler.batch / sampler.batches_per_epoch()
            self.logger.log(step, {**metrics, "train/epoch": epoch})
        if (self.train.save_every and step % self.train.save_every == 0) or step == self.steps:
            save_training_state(self.run_dir, step, model=model, optimizer=self.optimizer, scheduler=self.scheduler,
                                state={"sampler": sampler.state_dict(), **scaler_state(self.scaler), **(extra_state or {})},
                                keep=self.train.save_total_limit, info=self.info)


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """The fp16 loss scaler's state for state.json (a resumed run keeps its scale instead of re-probing
    from 65536 through overflowing steps); empty without a scaler."""
    if scaler is None or not scaler.is_enabled():
        return {}
    return {"grad_scaler": {k: float(v) if isinstance(v, float) else v for k, v in scaler.state_dict().items()}}


def restore_scaler(scaler: torch.amp.GradScaler | None, ckpt: dict[str, Any]) -> None:
    if scaler is not None and scaler.is_enabled() and ckpt.get("grad_scaler"):
        scaler.load_state_dict(ckpt["grad_scaler"])


def open_session(cfg: Any, *, model: torch.nn.Module, sampler: BatchSampler, resume: str | None, info: DistInfo,
                 device: torch.device) -> Session:
    """Create/resume the run in `cfg.output_dir` for `model`, trained with `cfg.train` over `sampler`."""
    train: TrainConfig = cfg.train
    run_dir = prepare_run_dir(cfg, cfg.output_dir, resume=resume, overwrite=cfg.overwrite, info=info)
    steps = total_steps(train, sampler.batches_per_epoch())
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, steps)
    amp = autocast_dtype(train.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    start, finished, state = 0, False, {}
    if resume is not None:
        ckpt = restore_training_state(run_dir, resume, model=model, optimizer=optimizer, scheduler=scheduler, info=info)
        sampler.load_state_dict(ckpt["sampler"])
        restore_scaler(scaler, ckpt)
        state = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "rng")}
        start = ckpt["step"]
        print0(info, f"resumed from {ckpt['folder']} at step {start}")
        finished = start >= steps and (run_dir / "model").is_dir()
        if finished:
            print0(info, f"the run already finished ({start}/{steps} steps); raise train.max_steps or train.epochs "
                         f"to train further. Model: {run_dir / 'model'}")
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.enabled else model
    logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard,
                           resume_step=start if resume is not None else None)
    return Session(run_dir, steps, start, finished, optimizer, scheduler, scaler, amp, ddp, logger, train, info, state)
