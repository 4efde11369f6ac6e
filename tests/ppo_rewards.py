"""Programmatic rewards used by the PPO tests (importable as tests.ppo_rewards:NAME)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _aligned_set() -> frozenset[int]:
    """Token ids whose tiny:llama output embedding points along one fixed direction (about half the
    vocabulary). A freshly initialized tiny model samples them about half the time, and one shift of its
    final hidden state raises all of them together, so the signal is dense and learnable in a few steps
    (a reward on token ids with no shared structure, e.g. parity, is not learnable by a random model)."""
    import torch

    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.tiny import build_tiny

    weights = build_tiny("llama", load_tokenizer("tiny:llama")).get_output_embeddings().weight.detach()
    direction = torch.randn(weights.size(1), generator=torch.Generator().manual_seed(0))
    return frozenset(torch.nonzero(weights @ direction > 0).flatten().tolist())


def aligned_tokens(prompts: list, completions: list[str], completion_ids: list[list[int]]) -> list[float]:
    """Fraction of the completion's tokens in `_aligned_set()`: starts near 0.5."""
    chosen = _aligned_set()
    return [sum(1 for t in ids if t in chosen) / max(len(ids), 1) for ids in completion_ids]


def text_length(prompts: list, completions: list[str]) -> list[float]:
    return [float(len(c)) for c in completions]


def wrong_count(prompts: list, completions: list[str]) -> list[float]:
    return [0.0]


def not_a_number(prompts: list, completions: list[str]) -> list[object]:
    return ["high"] * len(completions)


def nan_score(prompts: list, completions: list[str]) -> list[float]:
    return [float("nan")] * len(completions)


def explodes(prompts: list, completions: list[str]) -> list[float]:
    raise RuntimeError("scorer crashed")


def huge_score(prompts: list, completions: list[str]) -> list[float]:
    """Finite but absurd (1e30): PPO's value loss and gradients overflow to inf."""
    return [1e30] * len(completions)
