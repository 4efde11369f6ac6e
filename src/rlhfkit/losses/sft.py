"""Supervised fine-tuning loss: next-token cross-entropy on labeled (completion) tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood of the labeled tokens.

    logits: (B, T, V) from the model at positions 0..T-1; labels: (B, T) aligned with the *inputs*
    (-100 = no loss), so position t predicts labels[t + 1].

    `num_tokens` is the normaliser. With gradient accumulation or several ranks, pass the number of
    labeled tokens in the whole optimizer step so every token weighs the same; dividing each micro-
    batch by its own count would weigh tokens in short batches more (the bug transformers fixed in 4.46).
    Returns (loss, metrics) with metrics `nll_sum`, `num_tokens`, `num_correct` (all detached).
    """
    shift_logits = logits[:, :-1, :]  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    mask = shift_labels != IGNORE
    count = mask.sum()
    denom = num_tokens if num_tokens is not None else count.clamp(min=1)
    loss = nll_sum / denom
    with torch.no_grad():
        correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return loss, {"nll_sum": nll_sum.detach(), "num_tokens": count.detach(), "num_correct": correct.detach()}
