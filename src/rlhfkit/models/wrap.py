"""What sits around a transformers model at training time (DDP, torch.compile, PEFT) and the reference
model that DPO and PPO compare against. One place for the unwrapping rules, so the policy, the critic,
the sampler and the checkpoint writer all agree on what "the model" is."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (or torch.compile) wrappers; a PEFT model stays a PEFT model."""
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP, compile and PEFT wrappers (LoRA layers are injected in place,
    so calling it still applies the adapters): for its config, its forward signature and its parts."""
    model = unwrap(model)
    return model.get_base_model() if is_peft(model) else model


@contextlib.contextmanager
def reference_mode(policy: torch.nn.Module, ref_model: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """Yield the module that computes reference log-probs: the separate frozen `ref_model`, or (LoRA,
    `ref_model` None) the policy itself with its adapters disabled for the block: no second copy."""
    if ref_model is not None:
        yield ref_model
        return
    inner = unwrap(policy)
    with inner.disable_adapter():
        yield inner
