"""Reward-model losses: pairwise Bradley-Terry, regression on ratings, classification.

Each is a pure function of score tensors returning `(loss, metrics)`: the loss is the mean over the
batch, metrics are detached batch means. Recipes that accumulate over micro-batches and ranks weigh the
loss themselves (`loss * B / examples_in_step`), so every pair counts the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise preference loss under the Bradley-Terry model.

        P(chosen > rejected) = sigmoid(r_c - r_r)
        loss = -mean log sigmoid(r_c - r_r - m)  +  center_coef * mean (r_c + r_r)^2

    r_chosen, r_rejected: (B,) scalar rewards. `margin` m: (B,) or None; the Llama 2 margin loss
    (Touvron et al. 2023, Eq. 2) asks the chosen reward to exceed the rejected one by at least m.
    The centering term (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`) keeps the rewards
    near zero, which the Bradley-Terry loss alone leaves undetermined (it only sees differences).

    Metrics: `accuracy` = fraction with r_c > r_r (ties count as wrong), `margin` = mean r_c - r_r,
    `chosen` / `rejected` = mean rewards.
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef > 0:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "chosen": r_chosen.mean(),
            "rejected": r_rejected.mean(),
        }
    return loss, metrics


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error of predicted scores: loss = mean (pred - target)^2.

    pred, target: (B,). Targets are usually z-scored beforehand ((y - mean) / std over the train set),
    so the loss is in units of the target's standard deviation. Metrics: `mse` (= loss, detached).
    """
    loss = F.mse_loss(pred, target.to(pred.dtype))
    return loss, {"mse": loss.detach()}


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy over classes: loss = -mean log softmax(logits)[label].

    logits: (B, K); labels: (B,) integer class indices in [0, K). Metrics: `accuracy` (argmax == label).
    """
    loss = F.cross_entropy(logits, labels.long())
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, {"accuracy": accuracy}


def pearson_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    """Pearson correlation from running sums (so it can be all-reduced across ranks and batches).

        r = (n Sxy - Sx Sy) / sqrt((n Sxx - Sx^2) (n Syy - Sy^2))

    Returns 0.0 when either variable is constant (the correlation is undefined).
    """
    cov = n * sxy - sx * sy
    var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
    if n < 2 or var_x <= 0 or var_y <= 0:
        return 0.0
    return cov / math.sqrt(var_x * var_y)


def mean_std_from_sums(n: float, s: float, ss: float) -> tuple[float, float]:
    """Mean and population standard deviation from (count, sum, sum of squares)."""
    if n <= 0:
        return 0.0, 0.0
    mean = s / n
    return mean, math.sqrt(max(ss / n - mean * mean, 0.0))
