"""The part of a training run every gradient recipe sets up the same way: run folder, optimizer and
schedule, mixed precision, resume, DDP wrapping, the guarded optimizer update, logging and checkpoint
cadence.

A recipe checks its run folder early (`check`, before minutes of set-up; read-only), opens a
`Session` once its models are built (which locks the folder, restores a checkpoint, and only then
writes the run's first files), and then runs its own explicit loop: forward under `session.no_sync(...)`,
`session.backward(loss)`, `session.step(...)` (or `session.update(...)` for several updates per step),
`session.end_step(...)`; `session.close()` at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhfkit.config import opt
from rlhfkit.data.sampler import BatchSampler
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.checkpoint import restore_training_state, save_training_state
from rlhfkit.runtime.distributed import DistInfo, broadcast_object, local_rank_from_env, print0, run_on_ranks
from rlhfkit.runtime.metrics import MetricsLogger, ProgressBar
from rlhfkit.runtime.optim import (
    NonFiniteGuard,
    TrainConfig,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    guarded_update,
    total_steps,
)
from rlhfkit.runtime.rundir import RunFolder, check_run_dir, claim_run_dir


@dataclass
class RunConfig:
    """The run-level options of every language-model recipe (each redeclares `output_dir` for its default)."""

    output_dir: str = opt("runs/run", "run folder: config, metrics, TensorBoard logs, checkpoints, final model")
    overwrite: bool = opt(False, "replace an existing rlhfkit run in output_dir instead of refusing (never other files)")
    seed: int = opt(42, "seed for initialization, data order and sampling")
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "write TensorBoard logs to output_dir/tensorboard")

    def validate(self) -> None:
        if not self.output_dir.strip():
            raise ConfigError("output_dir", "expected a folder path for the run")


C = TypeVar("C")


def launch(body: Callable[[C, str | None, torch.device, DistInfo], Path], cfg: C, resume: str | None) -> Path:
    """Run a recipe's `body(cfg, resume, device, info)` on this process's device, alone or as one rank
    under torchrun (joining and always leaving the process group); returns what the body returns."""
    from rlhfkit.models.load import resolve_device

    device = resolve_device(cfg.model.device, local_rank_from_env())  # type: ignore[attr-defined]
    return run_on_ranks(lambda info: body(cfg, resume, device, info), device)


def check(cfg: RunConfig, resume: str | None, info: DistInfo) -> None:
    """Check `cfg.output_dir` (and the checkpoint to resume) before a recipe's long set-up; writes nothing."""
    check_run_dir(cfg.output_dir, resume=resume, overwrite=cfg.overwrite, info=info)


@dataclass
class Session:
    folder: RunFolder
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
    guard: NonFiniteGuard
    state: dict[str, Any]
    """The restored checkpoint's state.json (empty for a new run): recipes keep running statistics here."""

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    def progress(self, enabled: bool, description: str) -> ProgressBar:
        return ProgressBar(self.steps, enabled=self.info.is_main and enabled, start=self.start, description=description)

    def should_eval(self, step: int) -> bool:
        """Periodic eval inside the run (the recipe evaluates before and after the loop itself)."""
        return bool(self.train.eval_every) and step % self.train.eval_every == 0 and step != self.steps

    def final_eval_due(self) -> bool:
        """False only when a resumed run had already logged its final evaluation (it was stopped after its
        last checkpoint but before the final model was saved): the same on every rank."""
        done = self.start >= self.steps and self.logger.logged(self.steps, "eval/")
        return not broadcast_object(done, self.info)

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: DDP all-reduces gradients only on the `last` one."""
        return self.ddp.no_sync() if self.info.enabled and not last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self, model: torch.nn.Module, step: int, losses: dict[str, float]) -> float:
        """One guarded optimizer update (no schedule step); returns the gradient norm before clipping."""
        return guarded_update(model, self.optimizer, self.guard, step, losses, max_grad_norm=self.train.max_grad_norm,
                              info=self.info, scaler=self.scaler)

    def step(self, model: torch.nn.Module, step: int, losses: dict[str, float]) -> tuple[float, float]:
        """The update of optimizer step `step`, then the schedule: (grad norm, learning rate used)."""
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.update(model, step, losses)
        self.scheduler.step()
        return grad_norm, lr

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

    def close(self) -> None:
        if self.guard.skipped_total:
            print0(self.info, f"warning: {self.guard.skipped_total} update(s) with a non-finite loss or gradient norm "
                              "were skipped (train.on_nonfinite=skip)")
        self.logger.close()
        self.folder.release()


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
                 device: torch.device, recipe: str) -> Session:
    """Build optimizer and schedule for `model` (trained with `cfg.train` over `sampler`), lock the run
    folder, restore the chosen checkpoint on resume, and only then write the run's first files."""
    train: TrainConfig = cfg.train
    amp = autocast_dtype(train.mixed_precision, device, cpu_bf16=getattr(cfg, "CPU_BF16_AUTO", False))
    folder = claim_run_dir(cfg.output_dir, resume=resume, overwrite=cfg.overwrite, info=info)
    steps = total_steps(train, sampler.batches_per_epoch())
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, steps)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    start, finished, state = 0, False, {}
    if folder.resume_from is not None:
        ckpt = restore_training_state(folder.resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                      info=info)
        if not isinstance(ckpt.get("sampler"), dict):
            raise RlhfkitError(f"{folder.resume_from}: state.json has no data position ('sampler'); it is not a "
                               f"checkpoint of `rlhfkit {recipe}`")
        sampler.load_state_dict(ckpt["sampler"])
        restore_scaler(scaler, ckpt)
        state = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "rng")}
        start = ckpt["step"]
    folder.start(cfg)
    if folder.resume_from is not None:
        print0(info, f"resumed from {folder.resume_from} at step {start}")
        finished = start >= steps and (folder.path / "model").is_dir()
        if finished:
            print0(info, f"the run already finished ({start}/{steps} steps); raise train.max_steps or train.epochs "
                         f"to train further. Model: {folder.path / 'model'}")
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.enabled else model
    logger = MetricsLogger(folder.path, enabled=info.is_main, tensorboard=cfg.tensorboard,
                           resume_step=start if folder.resume_from is not None else None)
    guard = NonFiniteGuard(train.on_nonfinite, train.max_nonfinite_skips, recipe, run_dir=folder.path)
    return Session(folder, steps, start, finished, optimizer, scheduler, scaler, amp, ddp, logger, train, info, guard,
                   state)
