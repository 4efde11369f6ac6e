"""Checkpoints that resume exactly, written atomically.

A checkpoint is a folder `RUN/checkpoints/step-00000050/` holding:

- `model/`: `save_pretrained` output (full safetensors weights, or the PEFT adapter), loadable by
  transformers/peft on its own;
- `optimizer.pt`, `scheduler.pt`, `rng.pt`: tensors and plain data only, read back with
  `torch.load(weights_only=True)`, which refuses arbitrary pickled objects;
- `state.json`: step, data position, and any running statistics a recipe keeps;
- `manifest.json` (written last): the size and SHA-256 of every other file, checked before a resume.

The folder is written under a temporary name and renamed into place, and `checkpoints/latest` is
replaced atomically after that, so an interrupted save never leaves a checkpoint that looks complete;
a file damaged later (a full disk, a copy cut short) is caught by the manifest, and resuming from
`latest` then falls back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.save import save_model
from rlhfkit.models.wrap import is_peft, unwrap
from rlhfkit.runtime.atomic import atomic_folder, write_atomic
from rlhfkit.runtime.distributed import DistInfo, barrier
from rlhfkit.runtime.seeding import rng_state, set_rng_state

STATE_FILE = "state.json"
MANIFEST = "manifest.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng: list[dict[str, Any]],
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` (0 = all). Call on rank 0 only."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    # the temporary name starts with .tmp-step-: what the next start removes after a kill mid-save
    with atomic_folder(final, prefix=f".tmp-{checkpoint_name(step)}-") as tmp:
        save_model(model, tmp / "model")  # with rlhfkit.json beside a PEFT adapter, as the final model
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        files = {str(f.relative_to(tmp)): _describe(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    write_atomic(root / "latest", final.name + "\n")
    if keep > 0:
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_checkpoint(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` (None when it is intact): missing files, a state.json that
    does not parse, or a file whose size or hash differs from the manifest written at save time.
    Checkpoints from before the manifest are checked for their files and state.json only."""
    if not folder.is_dir():
        return "not a folder"
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} holds no step number"
    needed = [f"{name}.pt" for name in ("optimizer", "scheduler", "rng")]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not (folder / "model").is_dir():
        missing.append("model/")
    if missing:
        return "missing " + ", ".join(missing)
    if not (folder / MANIFEST).is_file():
        return None  # written before manifests existed (choose_checkpoint warns that it is unverified)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    stamps = []
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        st = path.stat()
        if st.st_size != want.get("size"):
            return f"{name} has {st.st_size} bytes, {want.get('size')} were saved (truncated or replaced)"
        stamps.append((name, st.st_size, st.st_mtime_ns))
    key = (str(folder.resolve()), tuple(stamps))
    if key in _VERIFIED:  # hashed already in this process (the early check, then the claim), unchanged since
        return None
    for name, want in files.items():
        if _describe(folder / name)["sha256"] != want.get("sha256"):
            return f"{name} does not match the hash recorded when it was saved (damaged)"
    _VERIFIED.add(key)
    return None


_VERIFIED: set[tuple] = set()
"""Checkpoints whose hashes matched, with the size and mtime of each file then: a resume checks a
checkpoint twice (before set-up, then under the lock) and hashes a large model only once."""


def choose_checkpoint(run_dir: Path, which: str, warn: Callable[[str], None] = print) -> Path:
    """The checkpoint a `--resume` continues from, verified (`verify_checkpoint`).

    `latest`: the newest intact checkpoint of `run_dir`, warning about each damaged newer one it skips.
    A folder path: that checkpoint, which must be intact.
    """
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).exists() and not (path / MANIFEST).exists():
            raise RlhfkitError(f"--resume {which}: not a checkpoint folder (no {STATE_FILE} inside)")
        problem = verify_checkpoint(path)
        if problem:
            raise RlhfkitError(f"--resume {which}: the checkpoint is damaged: {problem}. Resume from another "
                               "checkpoint folder, or --resume alone for the newest intact one.")
        _warn_unverified(path, warn)
        return path
    root = run_dir / "checkpoints"
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    if not done:
        raise RlhfkitError(f"--resume: no checkpoint found in {root}; start without --resume")
    damaged = []
    for path in done:
        problem = verify_checkpoint(path)
        if problem is None:
            if damaged:
                warn(f"resuming from {path.name}, the newest intact checkpoint (skipped: "
                     + "; ".join(f"{p.name}: {why}" for p, why in damaged) + ")")
            _warn_unverified(path, warn)
            return path
        damaged.append((path, problem))
    raise RlhfkitError(f"--resume: every checkpoint in {root} is damaged (" + "; ".join(
        f"{p.name}: {why}" for p, why in damaged) + "); start without --resume (overwrite=true)")


def _warn_unverified(path: Path, warn: Callable[[str], None]) -> None:
    if not (path / MANIFEST).is_file():
        warn(f"{path} has no {MANIFEST} (an older rlhfkit wrote it, or it was removed): its files cannot be "
             "checked for damage before they are loaded")


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """`latest` -> the newest intact checkpoint of `run_dir`; otherwise a checkpoint folder path."""
    return choose_checkpoint(run_dir, which)


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load `save_pretrained` output back into an already built model (full or PEFT)."""
    model = unwrap(model)
    if hasattr(model, "load_checkpoint_weights"):  # composite models (PPO's policy + value) load their parts
        model.load_checkpoint_weights(folder)
        return
    if is_peft(model):
        from peft import set_peft_model_state_dict

        weights = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RlhfkitError(f"checkpoint adapter in {folder} does not match the model: {unexpected[:3]}")
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RlhfkitError(f"no safetensors weights in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights (e.g. lm_head = embed_tokens) are saved once; anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RlhfkitError(f"checkpoint weights in {folder} do not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """Read optimizer/scheduler/rng/state of a checkpoint (weights are loaded by load_model_weights)."""
    out: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
    for name in ("optimizer", "scheduler", "rng"):
        out[name] = torch.load(folder / f"{name}.pt", weights_only=True, map_location="cpu")
    return out


# --------------------------------------------------------------------------------------------------
# Save and restore a whole training state (all ranks call these)


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
    """Checkpoint from rank 0 (after collecting all ranks' RNG states).

    Weights that are no longer finite are never saved: checkpoint rotation would otherwise delete the
    last good checkpoints to make room for a useless one."""
    bad = [name for name, p in unwrap(model).named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        from rlhfkit.runtime.optim import NonFiniteError

        raise NonFiniteError(f"the weights are no longer finite at step {step} ({bad[0]}"
                             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); this step was not "
                             f"checkpointed, the earlier checkpoints in {run_dir / 'checkpoints'} are kept. "
                             "Lower train.lr or keep train.max_grad_norm > 0.")
    rng = gather_rng(info)
    path = None
    if info.is_main:
        path = save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng,
                               state=state, keep=keep)
    barrier(info)
    return path


def restore_training_state(
    folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, info: DistInfo,
) -> dict[str, Any]:
    """Load checkpoint `folder` (verified by `choose_checkpoint`) into model/optimizer/scheduler and this
    rank's RNG; return its state dict. A checkpoint that does not fit this run is one clear error."""
    try:
        ckpt = load_checkpoint(folder)
    except Exception as exc:  # noqa: BLE001 - any unreadable file of a checkpoint is the same problem
        raise RlhfkitError(f"{folder}: cannot read the checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                           "resume from another checkpoint folder or start a new run") from None
    _check_weights_kind(model, folder / "model")
    try:
        load_model_weights(model, folder / "model")
    except RlhfkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a safetensors header cut short in a pre-manifest checkpoint
        raise RlhfkitError(f"{folder}: cannot load the checkpoint's weights ({type(exc).__name__}: {str(exc)[:200]})"
                           "; resume from another checkpoint folder or start a new run") from None
    # This run's hyperparameters (lr, weight decay, betas, eps: what the config says now), which
    # load_state_dict would replace with the checkpoint's: a resume with a changed train.lr uses it.
    settings = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:  # parameter groups/counts differ, e.g. a gym checkpoint from before the flat buffer
        raise RlhfkitError(f"{folder}: the optimizer state does not fit this run's parameters ({exc}); it was "
                           "written for a different model or by an older rlhfkit: start a new run") from None
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # Recompute this step's learning rate from the current schedule: identical to the saved one when
    # the run continues unchanged, correct when train.lr or max_steps/epochs changed.
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    rngs = ckpt["rng"]
    set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
    ckpt["folder"] = str(folder)
    return ckpt


def _check_weights_kind(model: torch.nn.Module, folder: Path) -> None:
    """A LoRA run resumed without LoRA (or the reverse) is named as such, not as a missing file."""
    inner = unwrap(model)
    parts = [(getattr(inner, "policy", inner), folder)]
    for peft_model, where in parts:
        saved_adapter = (where / "adapter_model.safetensors").is_file()
        if is_peft(peft_model) and not saved_adapter:
            raise RlhfkitError(f"{folder.parent}: the checkpoint holds full weights, but this run has "
                               "lora.enabled=true; resume with the setting the run started with (see config.yaml)")
        if not is_peft(peft_model) and saved_adapter:
            raise RlhfkitError(f"{folder.parent}: the checkpoint holds a LoRA adapter, but this run has "
                               "lora.enabled=false; resume with the setting the run started with (see config.yaml)")
