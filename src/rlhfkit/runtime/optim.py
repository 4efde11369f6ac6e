"""Optimization pieces every gradient-based recipe shares: the train config, AdamW and its schedule,
one guarded optimizer update (non-finite losses or gradients stop the run or skip the step), and
autocast. Recipes keep their own explicit loops and call these (through `runtime.session`)."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import opt
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.distributed import DistInfo, all_reduce_sum


@dataclass
class TrainConfig:
    lr: float = opt(2e-5, "peak learning rate", gt=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms)", ge=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2", ge=0.0, lt=1.0)
    adam_eps: float = opt(1e-8, "AdamW epsilon", gt=0.0)
    batch_size: int = opt(8, "examples per device per micro-batch", gt=0)
    grad_accum: int = opt(1, "micro-batches per optimizer step", gt=0)
    max_steps: int = opt(0, "optimizer steps to run; 0 = derive from epochs", ge=0)
    epochs: float = opt(1.0, "passes over the training data (used when max_steps is 0)", gt=0.0)
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate decay after warm-up")
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up linearly from 0", ge=0.0, lt=1.0)
    warmup_steps: int = opt(0, "warm-up steps (overrides warmup_ratio when > 0)", ge=0)
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of lr", ge=0.0, le=1.0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping", ge=0.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "autocast dtype; auto = bf16 on CUDA GPUs that support it (and, for dpo and ppo, on CPUs with "
        "native bf16: avx512_bf16 or AMX), otherwise none"
    )
    log_every: int = opt(1, "log train metrics every N steps", gt=0)
    eval_every: int = opt(0, "evaluate every N steps; 0 = before and after training only", ge=0)
    eval_batch_size: int = opt(8, "examples per device per eval batch", gt=0)
    save_every: int = opt(0, "checkpoint every N steps; 0 = only at the end", ge=0)
    save_total_limit: int = opt(2, "checkpoints to keep (oldest deleted first); 0 = keep all", ge=0)
    on_nonfinite: Literal["stop", "skip"] = opt(
        "stop", "a NaN/inf loss or gradient norm: stop the run (the last finite checkpoint is kept), or skip "
                "that update (no optimizer step) up to max_nonfinite_skips times in a row"
    )
    max_nonfinite_skips: int = opt(10, "on_nonfinite=skip: consecutive skipped updates before the run stops", gt=0)



def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * micro_batches_per_epoch / cfg.grad_accum))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine/linear decay to min_lr_ratio, or constant."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_ratio * steps))
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteError(RlhfkitError):
    """Training produced a NaN or infinite loss, gradient norm or weight. Exit code 3: the input may be
    fine; the optimization diverged."""

    exit_code = 3


@dataclass
class NonFiniteGuard:
    """The one check every recipe runs before each optimizer update (`train.on_nonfinite`).

    stop: raise NonFiniteError naming the metric and the step (no update is applied, so the weights
    and the last checkpoint stay finite); skip: drop the update and go on, until more than
    `max_skips` updates in a row were dropped.
    """

    mode: Literal["stop", "skip"] = "stop"
    max_skips: int = 10
    recipe: str = "training"
    hint: str = ("Try a lower train.lr, train.max_grad_norm > 0, train.mixed_precision=no, a check of the data or "
                 "reward, or train.on_nonfinite=skip to drop such updates.")
    run_dir: Path | None = None
    """The run folder, to name the checkpoint a stopped run can continue from."""
    skipped_in_row: int = 0
    skipped_total: int = field(default=0)

    def check(self, step: int, values: dict[str, float]) -> bool:
        """True when every value is finite (apply the update); False to skip it; raises to stop."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if not bad:
            self.skipped_in_row = 0
            return True
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        if self.mode == "skip" and self.skipped_in_row < self.max_skips:
            self.skipped_in_row += 1
            self.skipped_total += 1
            print(f"warning: {self.recipe} step {step}: {what}; update skipped "
                  f"({self.skipped_in_row} in a row, at most {self.max_skips})", flush=True)
            return False
        reason = (f"{self.skipped_in_row + 1} updates in a row were not finite (train.max_nonfinite_skips="
                  f"{self.max_skips})") if self.mode == "skip" else "the run stopped before applying it"
        raise NonFiniteError(f"{self.recipe} step {step}: {what}; {reason}. No final model was written; "
                             f"{self._checkpoint_note()} {self.hint}")

    def _checkpoint_note(self) -> str:
        root = self.run_dir / "checkpoints" if self.run_dir is not None else None
        done = sorted(p for p in root.glob("step-*") if p.is_dir()) if root is not None and root.is_dir() else []
        if not done:
            return "no checkpoint had been written yet." if self.run_dir is not None else "the last finite checkpoint is kept."
        return (f"the last finite checkpoint, {done[-1]}, is kept (continue from it with --resume after changing "
                "a setting, or start over if the divergence began before it).")


def guarded_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, step: int,
                   losses: dict[str, float], *, max_grad_norm: float, info: DistInfo,
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimizer update after backward: unscale (fp16), clip the global grad norm (0 = no clipping),
    check the losses and the norm (`guard`), step, zero the gradients. Returns the norm before clipping.

    `losses` are this rank's values; a non-finite one on any rank stops (or skips) every rank alike.
    Under an fp16 GradScaler an infinite gradient is the scaler's business (it skips the step and
    lowers the scale), so only the losses are checked then.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")).item()
    values = dict(losses)
    if info.enabled:  # one rank's NaN loss must stop every rank, not leave them waiting in a collective
        bad = all_reduce_sum(torch.tensor([float(not math.isfinite(v)) for v in values.values()]), info)
        values = {k: (float("nan") if b > 0 else v) for (k, v), b in zip(values.items(), bad.tolist())}
    if scaler is None:
        values["train/grad_norm"] = grad_norm
    if guard.check(step, values):
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (x86 avx512_bf16 or AMX, read from /proc/cpuinfo).

    Without it, CPU autocast to bf16 converts in software and is slower than float32.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(mode: str, device: torch.device, cpu_bf16: bool = False,
                   field: str = "train.mixed_precision") -> torch.dtype | None:
    """The autocast dtype of `train.mixed_precision` (or of a sampler's `mixed_precision`, named by `field`);
    `cpu_bf16`: `auto` includes CPUs with native bf16 (dpo, ppo, candidate and eval sampling:
    benchmarks/RESULTS.md has what bf16 changes in their results)."""
    if mode not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError(field, f"expected auto, no, bf16 or fp16, got {mode!r}")
    if mode == "no":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError(field, f"fp16 autocast needs a CUDA GPU (device is {device}); use bf16 or no")
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_bf16 and cpu_native_bf16():
            return torch.bfloat16
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


