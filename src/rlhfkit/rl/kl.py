"""KL penalty estimators and KL-coefficient controllers for RLHF.

Per-token estimates of KL(pi || ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html). With r = log ref(x) - log pi(x):

| estimator | value            | unbiased | always >= 0 |
| --------- | ---------------- | -------- | ----------- |
| k1        | -r               | yes      | no          |
| k2        | r^2 / 2          | no       | yes         |
| k3        | (e^r - 1) - r    | yes      | yes         |

As a *reward* penalty (`kl_in=reward`, PPO and RLOO) only the value matters. As a *loss* term
(`kl_in=loss`, GRPO's form) the gradient matters, and on samples from pi the three differ
(Schulman 2020; Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation"):

| estimator as a loss | expected gradient                                   |
| ------------------- | --------------------------------------------------- |
| k1                  | zero: it regularizes nothing (refused in loss mode) |
| k2                  | the gradient of KL(pi || ref)                       |
| k3                  | the gradient of KL(ref || pi) (the reverse direction) |

The coefficient beta of the penalty `-beta * KL` is fixed, or adapted towards a target KL
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2).
"""

from __future__ import annotations

from typing import Literal

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: Literal["k1", "k2", "k3"] = "k1",
    *,
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate, same shape as logp (e.g. (B, L)); masking is the caller's.

    logp, ref_logp: log-probs of the sampled tokens under the policy and the reference. `clamp` bounds
    the *estimate* to [-clamp, clamp] (as OpenRLHF and verl do, at 10): clamping the log-ratio
    instead would still let k3 reach e^clamp (22015 per token at clamp 10). The clamp passes no
    gradient where it binds.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    if clamp is not None and clamp <= 0:
        raise ValueError(f"kl_penalty: clamp must be > 0, got {clamp}")
    logratio = logp - ref_logp  # log pi - log ref = -r
    if estimator == "k1":
        kl = logratio
    elif estimator == "k2":
        kl = 0.5 * logratio**2
    else:
        kl = torch.expm1(-logratio) + logratio  # (e^r - 1) - r, expm1 keeps precision for small r
    return kl.clamp(-clamp, clamp) if clamp is not None else kl


class FixedKLController:
    """A constant KL coefficient with the controller interface."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller moving beta so the measured KL approaches `target` (Ziegler et al. 2019, Eq. 2).

    err = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + err * n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: KL measured on the last batch (same units as target); n_steps: samples in that batch."""
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
