"""PPO losses and diagnostics (Schulman et al. 2017, "Proximal Policy Optimization Algorithms").

The same functions serve language models ((B, L) token tensors with a response mask; means are taken
over all real tokens of the batch) and control tasks (flat (N,) tensors, no mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhfkit.rl.advantages import masked_mean, masked_var


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_range: float,
    clip_range_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (PPO Eq. 7, negated) and detached 0-dim stats.

    logp, old_logp, advantages, mask: same shape, (B, L) or (N,). With ratio = exp(logp - old_logp):

        pg_loss = mean_mask( max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)) )

    eps_low = clip_range, eps_high = clip_range_high (default clip_range; a larger one is DAPO's
    "clip-higher"). Stats: `clipfrac` (share of elements where the clipped term is strictly larger, so
    its gradient is 0), `approx_kl` (mean of (ratio - 1) - log ratio, the k3 estimate of KL(old || new)),
    `ratio` (mean).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    logratio = logp.float() - old_logp.float()
    if mask is not None:  # padding may hold anything; keep exp() finite there so gradients stay clean
        logratio = torch.where(mask.bool(), logratio, torch.zeros((), dtype=logratio.dtype, device=logratio.device))
    ratio = torch.exp(logratio)
    advantages = advantages.float()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    pg_loss = masked_mean(torch.maximum(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - logratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return pg_loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_range: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value loss 0.5 * mean_mask((V - R)^2), optionally clipped around the rollout values; and clipfrac.

    values, old_values, returns, mask: same shape. With clip_range c,
    V_clip = V_old + clip(V - V_old, -c, c) and the loss is 0.5 * mean_mask(max((V - R)^2, (V_clip - R)^2))
    (the PPO2 / OpenAI baselines form); clipfrac (detached, 0-dim) is the share where the clipped term is
    strictly larger. clip_range=None: plain squared error, clipfrac 0.
    """
    values, returns = values.float(), returns.float()
    v_loss_unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(v_loss_unclipped, mask), torch.zeros((), device=values.device)
    old_values = old_values.float()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    v_loss_clipped = (v_clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.maximum(v_loss_unclipped, v_loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).float(), mask)
    return v_loss, clipfrac


def entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 128) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of softmax(logits / temperature) at each position: (B, T, V) -> (B, T).

    Computed in float32, `chunk_size` positions (dim 1) at a time, so only (B, chunk, V) float32 slices
    exist at once instead of a full (B, T, V) float32 copy. Vocabulary entries at -inf contribute 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"entropy_from_logits: logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"entropy_from_logits: need temperature > 0 and chunk_size >= 1, got {temperature}, "
                         f"{chunk_size}")
    pieces = []
    for chunk in logits.split(chunk_size, dim=1):
        chunk = chunk.float()  # (B, c, V)
        if temperature != 1.0:
            chunk = chunk / temperature
        # clamp -inf log-probs to a finite floor so 0 * log 0 is 0, not nan
        logp = F.log_softmax(chunk, dim=-1).clamp(min=torch.finfo(torch.float32).min)  # (B, c, V)
        pieces.append(-(logp.exp() * logp).sum(-1))  # (B, c)
    if not pieces:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    return torch.cat(pieces, dim=1)


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """1 - Var[target - pred] / Var[target] over the masked-in elements; nan when Var[target] == 0.

    1 is a perfect value function, 0 is as good as predicting the mean, negative is worse.
    """
    pred, target = pred.detach().double(), target.detach().double()
    var_target = masked_var(target, mask).item()
    if var_target == 0:
        return math.nan
    return 1.0 - masked_var(target - pred, mask).item() / var_target
