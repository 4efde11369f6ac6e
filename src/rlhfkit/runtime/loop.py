"""Pieces every gradient-based recipe shares: the train config, optimizer, schedule, autocast,
run folder, and checkpoint/resume glue. Recipes keep their own explicit loops and call these."""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from rlhfkit.config import dump_yaml, opt, to_dict
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.runtime.checkpoint import find_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from rlhfkit.runtime.distributed import DistInfo, barrier, broadcast_object
from rlhfkit.runtime.seeding import rng_state, set_rng_state


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
        "auto", "autocast dtype; auto = bf16 on CUDA GPUs that support it, otherwise none"
    )
    log_every: int = opt(1, "log train metrics every N steps", gt=0)
    eval_every: int = opt(0, "evaluate every N steps; 0 = before and after training only", ge=0)
    eval_batch_size: int = opt(8, "examples per device per eval batch", gt=0)
    save_every: int = opt(0, "checkpoint every N steps; 0 = only at the end", ge=0)
    save_total_limit: int = opt(2, "checkpoints to keep (oldest deleted first); 0 = keep all", ge=0)



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


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float]:
    """Unscale (fp16), clip the global grad norm (0 = no clipping), step, advance the schedule, zero grads.

    Returns (grad_norm before clipping, learning rate used for this step).
    """
    lr = scheduler.get_last_lr()[0]
    grad_norm = apply_gradients(model, optimizer, max_grad_norm, scaler)
    scheduler.step()
    return grad_norm, lr


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                    scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimizer update without touching the schedule (PPO takes several per rollout step).

    Unscales (fp16), clips the global grad norm (0 = no clipping), steps and zeroes the gradients;
    returns the norm before clipping.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")).item()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "no":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.mixed_precision", f"fp16 autocast needs a CUDA GPU (device is {device}); use bf16 or no")
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Run folder and resume


def prepare_run_dir(cfg: Any, output_dir: str, *, resume: str | None, overwrite: bool, info: DistInfo) -> Path:
    """Create (rank 0) the run folder; refuse to clobber an earlier run unless asked; save the config."""
    check_run_dir(output_dir, resume=resume, overwrite=overwrite, info=info)
    run_dir = Path(output_dir)
    if info.is_main:
        if resume is None and _holds_run(run_dir):
            shutil.rmtree(run_dir)  # overwrite=true, checked above
        if resume is not None and (run_dir / "config.yaml").is_file():
            _warn_config_changes(yaml.safe_load((run_dir / "config.yaml").read_text()), to_dict(cfg))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    barrier(info)
    return run_dir


def check_run_dir(output_dir: str, *, resume: str | None, overwrite: bool, info: DistInfo) -> None:
    """Fail early (on every rank) if the run folder cannot be used; writes nothing.

    Recipes with a long set-up (DPO's reference pass) call this first, so a wrong output_dir or
    --resume is reported before minutes of work instead of after.
    """
    problem = None
    if info.is_main:
        try:
            _check_on_main(Path(output_dir), resume, overwrite)
        except RlhfkitError as exc:
            problem = str(exc)
    problem = broadcast_object(problem, info)
    if problem is not None:
        raise RlhfkitError(problem)


def _holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(
        (run_dir / name).exists() for name in ("checkpoints", "model", "config.yaml", "metrics.jsonl")
    )


def _check_on_main(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    if not str(run_dir).strip() or run_dir.resolve() == Path.cwd().resolve() or run_dir.resolve() == Path.home():
        raise RlhfkitError(f"output_dir '{run_dir}' must name a folder for this run (not the current or home folder)")
    if resume is None and _holds_run(run_dir) and not overwrite:
        raise RlhfkitError(
            f"{run_dir} already holds a run. Pass --resume to continue it, set overwrite=true to "
            "replace it, or choose another output_dir."
        )
    if resume is not None:
        find_checkpoint(run_dir, resume)


_HARMLESS = {"max_steps", "epochs", "eval_every", "save_every", "save_total_limit", "log_every", "progress",
             "sample_every", "overwrite"}


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, prefix + key + ".")
        elif a != b and key not in _HARMLESS:
            print(f"warning: resuming with {prefix}{key}={b!r} (the run started with {a!r})", flush=True)


def gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state, collected on rank 0 (others get an empty list)."""
    state = rng_state()
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out if info.is_main else []


def save_training_state(
    run_dir: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    state: dict[str, Any], keep: int, info: DistInfo,
) -> Path | None:
    """Checkpoint from rank 0 (after collecting all ranks' RNG states)."""
    rng = gather_rng(info)
    path = None
    if info.is_main:
        path = save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng,
                               state=state, keep=keep)
    barrier(info)
    return path


def restore_training_state(
    run_dir: Path, which: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    info: DistInfo,
) -> dict[str, Any]:
    """Load a checkpoint into model/optimizer/scheduler and this rank's RNG; return its state dict."""
    folder = find_checkpoint(run_dir, which)
    ckpt = load_checkpoint(folder)
    load_model_weights(model, folder / "model")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:  # parameter groups/counts differ, e.g. a gym checkpoint from before the flat buffer
        raise RlhfkitError(f"{folder}: the optimizer state does not fit this run's parameters ({exc}); it was "
                           "written for a different model or by an older rlhfkit: start a new run") from None
    scheduler.load_state_dict(ckpt["scheduler"])
    # Recompute this step's learning rate from the current schedule: identical to the saved one when
    # the run continues unchanged, correct when max_steps/epochs were extended.
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    rngs = ckpt["rng"]
    set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
    ckpt["folder"] = str(folder)
    return ckpt

