"""Direct Preference Optimization losses (Rafailov et al. 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model"), and the IPO / hinge / conservative variants.

All inputs are per-sequence summed log-probs of the response tokens, shape (B,). With
`h = (pi_c - ref_c) - (pi_r - ref_r)` (the difference of implicit rewards divided by beta):

| loss_type                   | per-pair loss                                                  | source |
| --------------------------- | -------------------------------------------------------------- | ------ |
| sigmoid                     | -log sigma(beta h)                                             | DPO Eq. 7 |
| sigmoid + label_smoothing e | -(1 - e) log sigma(beta h) - e log sigma(-beta h)              | cDPO (Mitchell 2023) |
| ipo                         | (h_avg - 1 / (2 beta))^2, h_avg from length-averaged log-probs | IPO, Azar et al. 2023, Eq. 17 |
| hinge                       | max(0, 1 - beta h)                                             | SLiC (Zhao et al. 2023) |
| + length_alpha a            | h_beta = beta h + a (len_c - len_r) in sigmoid / hinge         | R-DPO, Park et al. 2024, Eq. 9 |
| + sft_weight w (recipe)     | loss + w * (-pi_c / len_c), the chosen answer's mean token NLL | RPO, Pang et al. 2024 |

R-DPO: the preference data is explained by a reward that also pays `a` per token, so the policy is
optimal for `r - a |y|` and is not pushed toward length where the chosen answer is merely longer.

The implicit rewards `beta * (pi - ref)` are returned detached for logging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - eps) log sigma(beta h) - eps log sigma(-beta h); eps = 0 is the original DPO loss."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """(h_avg - 1/(2 beta))^2: regresses the length-averaged log-ratio gap to a finite target."""
    return (h_avg - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """max(0, 1 - beta h)."""
    return torch.relu(1.0 - beta * h)


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen answers' mean per-token negative log-likelihood (B,): RPO's SFT term."""
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses (B,), and chosen/rejected implicit rewards beta*(pi - ref) (B,).

    `chosen_lengths` / `rejected_lengths` (response token counts, (B,)) are required for IPO, which
    compares length-averaged log-ratios, and for R-DPO's `length_alpha` (sigmoid and hinge).
    """
    if loss_type not in _LOSSES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_ratio - rejected_ratio
    if length_alpha:
        if loss_type == "ipo":
            raise ValueError("length_alpha (R-DPO) applies to the sigmoid and hinge losses; IPO already averages over length")
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("length_alpha needs chosen_lengths and rejected_lengths (response token counts)")
        h = h + (length_alpha / beta) * (chosen_lengths - rejected_lengths).to(h.dtype)  # beta h + alpha (n_c - n_r)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("IPO needs chosen_lengths and rejected_lengths (response token counts)")
        h_avg = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = ipo_loss(h_avg, beta)
    elif loss_type == "sigmoid":
        losses = sigmoid_loss(h, beta, label_smoothing)
    else:
        losses = hinge_loss(h, beta)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
