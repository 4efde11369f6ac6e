"""Checkpoints that resume exactly, written atomically.

A checkpoint is a folder `RUN/checkpoints/step-00000050/` holding:

- `model/`: `save_pretrained` output (full safetensors weights, or the PEFT adapter), loadable by
  transformers/peft on its own;
- `optimizer.pt`, `scheduler.pt`, `rng.pt`: tensors and plain data only, read back with
  `torch.load(weights_only=True)`, which refuses arbitrary pickled objects;
- `state.json`: step, data position, and any running statistics a recipe keeps.

The folder is written under a temporary name and renamed into place, and `checkpoints/latest` is
replaced atomically after that, so an interrupted save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rlhfkit.errors import RlhfkitError

STATE_FILE = "state.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (or torch.compile) wrappers."""
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


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
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{checkpoint_name(step)}-", dir=root))
    try:
        unwrap(model).save_pretrained(str(tmp / "model"), safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_atomic(root / "latest", final.name + "\n")
    if keep > 0:
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """`latest` -> the newest complete checkpoint of `run_dir`; otherwise a checkpoint folder path."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise RlhfkitError(f"--resume {which}: not a checkpoint folder (no {STATE_FILE} inside)")
        return path
    root = run_dir / "checkpoints"
    marker = root / "latest"
    if marker.is_file():
        path = root / marker.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    if not done:
        raise RlhfkitError(f"--resume: no checkpoint found in {root}; start without --resume")
    return done[-1]


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
