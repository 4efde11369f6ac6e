"""Log-probabilities of label tokens without a full-vocabulary float32 log-softmax.

`log p(y_t) = logit[y_t] - logsumexp(logits)`: gather one logit per position and subtract the
log-partition, a chunk of positions at a time. Only a (B, chunk, V) float32 slice exists at once, so
memory stays flat as the vocabulary and the sequence grow (a naive `log_softmax(logits.float())` makes
a second (B, T, V) float32 tensor, 0.8 GB for 8 x 512 tokens at vocab 49k, and keeps it for backward).
"""

from __future__ import annotations

import torch

IGNORE = -100


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the next-token labels.

    logits: (B, T, V) at input positions 0..T-1; labels: (B, T) aligned with the inputs (-100 = none),
    so position t predicts labels[:, t + 1]. Logits are divided by `temperature` first (sampling at
    temperature tau draws from softmax(logits / tau); PPO's ratios and KL must use the same scale).
    Returns (logps, mask), both (B, T-1); logps is 0 where mask is False.
    """
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE
    # logits[:, :-1]: the last position predicts nothing inside the sequence
    return selected_logprobs(logits[:, :-1], target.clamp(min=0), temperature=temperature, chunk_size=chunk_size) * mask, mask


def selected_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 128
) -> torch.Tensor:
    """log softmax(logits / temperature)[target] for logits already aligned with their targets.

    logits: (B, T, V), position t scoring targets[:, t] (valid token ids everywhere); returns (B, T)
    float32, computed `chunk_size` positions at a time.
    """
    safe = targets.unsqueeze(-1)  # (B, T, 1)
    pieces = []
    for start in range(0, targets.size(1), chunk_size):
        chunk = logits[:, start : start + chunk_size].float()  # (B, c, V)
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, safe[:, start : start + chunk_size]).squeeze(-1)  # (B, c)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces, dim=1) if pieces else logits.new_zeros(targets.shape, dtype=torch.float32)


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's labeled tokens and their count: ((B,), (B,))."""
    logps, mask = token_logprobs(logits, labels, temperature=temperature, chunk_size=chunk_size)
    return logps.sum(-1), mask.sum(-1)
