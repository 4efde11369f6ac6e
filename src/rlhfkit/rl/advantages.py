"""Advantage estimation and batch statistics for PPO, RLOO and GRPO.

- `gae`: Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", Eq. 16), time-major (T, N) like CleanRL, with truncation kept apart
  from termination (a truncated step bootstraps from the value of its real final observation).
- `token_gae`: the same for language-model responses, batch-major (B, L) with a right-padded mask.
- `masked_mean`, `masked_var`, `whiten`: statistics over the real (masked-in) elements of a batch.
- `rloo_advantages`, `grpo_advantages`: critic-free advantages from k samples per prompt.
- `RunningMoments`: running mean/std over everything seen, for reward normalization (saved in checkpoints).
"""

from __future__ import annotations

import math

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (half precision is upcast for the recursion)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages and returns, both (T, N).

    All inputs are (T, N), time-major. `next_values[t]` is V(s_{t+1}) for the observation reached after
    step t (for a truncated step, the value of the real final observation, not of the reset one);
    `terminated[t]` = 1 where the episode ended in a terminal state (no bootstrap); `episode_end[t]` = 1
    where it ended for any reason (terminal or truncated), so the recursion does not cross it:

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - episode_end_t) * A_{t+1},   A_T = 0
        R_t     = A_t + V(s_t)

    A terminated step also counts as an episode end. Computed in float32 (float64 if an input is float64)
    by a reverse loop over T, vectorized over N; inputs are not modified.
    """
    shape = rewards.shape
    for name, t in (("values", values), ("next_values", next_values), ("terminated", terminated),
                    ("episode_end", episode_end)):
        if t.shape != shape:
            raise ValueError(f"gae: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} like rewards")
    dtype = _compute_dtype(rewards, values, next_values)
    rewards, values, next_values = rewards.to(dtype), values.to(dtype), next_values.to(dtype)
    not_terminal = 1.0 - terminated.to(dtype)  # (T, N)
    not_end = (1.0 - episode_end.to(dtype)) * not_terminal  # (T, N)
    deltas = rewards + gamma * next_values * not_terminal - values  # (T, N)
    steps: list[torch.Tensor] = []
    last = torch.zeros_like(deltas[0]) if len(deltas) else deltas.new_zeros(shape[1:])  # A_T = 0, (N,)
    for t in reversed(range(shape[0])):
        last = deltas[t] + gamma * lam * not_end[t] * last
        steps.append(last)
    advantages = torch.stack(steps[::-1]) if steps else deltas.new_zeros(shape)
    return advantages, advantages + values


def bootstrap_next_values(
    values: torch.Tensor,
    last_value: torch.Tensor,
    final_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
) -> torch.Tensor:
    """`next_values` for `gae` from a vectorized-env rollout, (T, ...) time-major:

        next_values[t] = values[t + 1]       (the observation reached after step t; last_value after T - 1)
                       = final_values[t]     where the episode was truncated at t (ended, not terminated)

    With autoreset, the observation after a truncated step is the next episode's first one; the value to
    bootstrap from is that of the real final observation (`final_values[t]`, only read where truncated).
    Terminated steps keep values[t + 1]: gae does not bootstrap them. `last_value` has the shape of one
    step, `values[0]`; the other inputs are (T, ...) like `values`.
    """
    for name, t in (("final_values", final_values), ("terminated", terminated), ("episode_end", episode_end)):
        if t.shape != values.shape:
            raise ValueError(f"bootstrap_next_values: {name} has shape {tuple(t.shape)}, expected {tuple(values.shape)}")
    if last_value.shape != values.shape[1:]:
        raise ValueError(f"bootstrap_next_values: last_value has shape {tuple(last_value.shape)}, "
                         f"expected {tuple(values.shape[1:])}")
    shifted = torch.cat([values[1:], last_value[None].to(values.dtype)], 0)
    truncated = (episode_end > 0) & (terminated == 0)
    return torch.where(truncated, final_values.to(values.dtype), shifted)


def token_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over language-model responses: advantages and returns, both (B, L), 0 where mask is 0.

    rewards, values, mask: (B, L), batch-major. mask is 1 on the real response tokens, contiguous from
    position 0 (right padding; a row may have length 0). Each row is one episode that terminates at its
    last real token (no bootstrap); inside it, V(s_{t+1}) = values[:, t + 1]. Built on `gae`.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"token_gae: rewards, values and mask must all be (B, L), got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    real = mask.bool()  # (B, L)
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("token_gae: mask must be contiguous from position 0 in every row (right padding)")
    dtype = _compute_dtype(rewards, values)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    # Padding may hold anything (even inf/nan): read rewards and values only at real tokens.
    rewards = torch.where(real, rewards.to(dtype), zero)
    values = torch.where(real, values.to(dtype), zero)
    next_real = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)  # (B, L)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, L)
    # The last real token and every padding position end (and terminate) an episode, so nothing crosses them.
    ends = (~next_real).to(dtype)  # (B, L)
    adv, _ = gae(rewards.T, values.T, next_values.T, ends.T, ends.T, gamma=gamma, lam=lam)  # (L, B)
    advantages = torch.where(real, adv.T, zero)
    returns = torch.where(real, advantages + values, zero)
    return advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the elements where mask is nonzero: sum(x * m) / sum(m), over `dim` or everything.

    x and mask have the same shape. An empty selection gives 0 (not nan), so an all-padding row or batch
    contributes nothing; masked-out elements may hold inf/nan without affecting the result.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = keep.sum() if dim is None else keep.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance (0-dim) over all masked-in elements: sum((x - mean)^2) / (n - 1) (n if not unbiased).

    A single element (or none) gives 0, never nan.
    """
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    mean = masked_mean(x, keep)
    sq = torch.where(keep, (x - mean) ** 2, torch.zeros((), dtype=x.dtype, device=x.device))
    n = keep.sum()
    denom = (n - 1 if unbiased else n).clamp(min=1)
    return sq.sum() / denom.to(sq.dtype)


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over all masked-in elements of the batch (unbiased var).

    shift_mean=False adds the mean back (scales only; TRL's variant for rewards). Masked-out positions
    are 0 in the output.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _groups(scores: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """(P*k,) scores, samples of one prompt contiguous -> (P, k)."""
    if k < 2:
        raise ValueError(f"{name}: k (samples per prompt) must be >= 2 to compare samples of a prompt, got {k}")
    if scores.dim() != 1 or scores.numel() % k != 0:
        raise ValueError(f"{name}: scores must be a flat tensor of P*k values (k={k} samples per prompt, "
                         f"contiguous), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.float()
    return scores.view(-1, k)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (P*k,): A_i = r_i - mean of the other k-1 samples of its prompt.

    scores: (P*k,), index = prompt * k + j. Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
    Style Optimization for Learning from Human Feedback in LLMs", Eq. 6.
    """
    g = _groups(scores, k, "rloo_advantages")  # (P, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)  # (P, k): mean of the others
    return (g - baseline).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalized advantages (P*k,): (r - mean_g) / (std_g + eps), or r - mean_g when scale=False.

    scores: (P*k,), index = prompt * k + j; std is the unbiased std of the k samples of a prompt.
    Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2 (outcome supervision).
    """
    g = _groups(scores, k, "grpo_advantages")  # (P, k)
    centered = g - g.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (g.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


class RunningMoments:
    """Running mean and std of every value passed to `update`, merged batch by batch in float64.

    Chan et al. 1979 parallel update: with batch (n_b, mean_b, M2_b) and delta = mean_b - mean,
    mean += delta * n_b / n;  M2 += M2_b + delta^2 * n_a * n_b / n.
    """

    def __init__(self) -> None:
        self._count = 0.0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        """Add every element of x (any shape)."""
        x = x.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        total = self._count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self._count * n / total
        self._count = total

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        """Unbiased std; 1.0 until two values were seen (so dividing by it is a no-op)."""
        return math.sqrt(self._m2 / (self._count - 1)) if self._count >= 2 else 1.0

    @property
    def count(self) -> int:
        return int(self._count)

    def state_dict(self) -> dict[str, float]:
        return {"count": float(self._count), "mean": float(self._mean), "m2": float(self._m2)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._count, self._mean, self._m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
