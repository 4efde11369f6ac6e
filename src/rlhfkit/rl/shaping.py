"""From completion scores to PPO/RLOO/GRPO advantages: the reward shaping of RLHF.

For N completions of R response tokens (right-padded; `mask` (N, R) marks real tokens):

| advantage | per-completion / per-token reward                                  | advantage                        |
| --------- | ------------------------------------------------------------------ | -------------------------------- |
| gae       | r_t = -beta * KL_t on every token, + score on the last real token  | GAE over tokens (critic values)  |
| rloo      | R = score - beta * sum_t KL_t (kl_in=reward), or score (kl_in=loss) | R - mean of the other k-1        |
| grpo      | same R                                                             | (R - group mean) / group std     |

(Ziegler et al. 2019 and Ouyang et al. 2022 for the per-token penalty; Ahmadian et al. 2024 for RLOO;
Shao et al. 2024 for GRPO.) Whitening of the advantages over the batch (masked) is on by default for
gae only: for rloo/grpo it can flip the sign of a completion's advantage (whitening subtracts a
token-weighted batch mean that differs from the per-prompt baseline), and TRL's RLOO does not do it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.rl.advantages import grpo_advantages, rloo_advantages, token_gae, whiten
from rlhfkit.rl.kl import kl_penalty


def penalize_unfinished(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the scores (N,) of completions that used the whole budget without EOS."""
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (N, R): -kl_coef * KL on every response token, plus the completion's score
    on its last real token (responses are right-padded: never on padding; empty rows get nothing)."""
    rewards = -kl_coef * kl * mask
    lengths = mask.sum(1).long()
    rows = torch.arange(scores.numel(), device=scores.device)
    return rewards.index_put((rows, (lengths - 1).clamp(min=0)), scores * (lengths > 0), accumulate=True)


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                     kl_in: Literal["reward", "loss"]) -> torch.Tensor:
    """One reward per completion (N,) for rloo/grpo: score - kl_coef * (summed KL over real tokens)
    when the KL is folded into the reward; the score alone when the KL goes into the loss instead."""
    if kl_in == "loss":
        return scores.clone()
    return scores - kl_coef * (kl * mask).sum(1)


@dataclass
class Shaped:
    advantages: torch.Tensor  # (N, R), zero on padding
    returns: torch.Tensor | None  # (N, R) value targets (gae only)
    kl: torch.Tensor  # (N, R) per-token KL estimate, zero on padding
    rlhf_reward: torch.Tensor  # (N,) what the policy is optimizing, per completion


def shape_rewards(
    scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor | None,
    mask: torch.Tensor, *, kl_coef: float, advantage: Literal["gae", "rloo", "grpo"] = "gae",
    kl_estimator: Literal["k1", "k2", "k3"] = "k1", kl_clamp: float | None = None,
    kl_in: Literal["reward", "loss"] = "reward", gamma: float = 1.0, lam: float = 0.95, samples_per_prompt: int = 1,
    grpo_scale: bool = True, whiten_advantages: bool | None = None,
) -> Shaped:
    """Advantages (and returns for gae) from scores (N,), log-probs (N, R), values (N, R) and mask (N, R).

    Completions of one prompt are adjacent (k = samples_per_prompt). `whiten_advantages` None means the
    default of the advantage: on for gae, off for rloo/grpo.
    """
    mask = mask.float()
    kl = kl_penalty(old_logps, ref_logps, kl_estimator, clamp=kl_clamp) * mask  # (N, R)
    returns = None
    if advantage == "gae":
        if values is None:
            raise ValueError("shape_rewards: advantage=gae needs the critic's values")
        rewards = token_rewards(scores, kl, mask, kl_coef)
        advantages, returns = token_gae(rewards, values, mask, gamma=gamma, lam=lam)
        rlhf_reward = (rewards * mask).sum(1)
    else:
        rlhf_reward = sequence_rewards(scores, kl, mask, kl_coef, kl_in)
        if advantage == "rloo":
            seq = rloo_advantages(rlhf_reward, samples_per_prompt)
        else:
            seq = grpo_advantages(rlhf_reward, samples_per_prompt, scale=grpo_scale)
        advantages = seq[:, None] * mask
    if whiten_advantages if whiten_advantages is not None else advantage == "gae":
        advantages = whiten(advantages, mask)
    return Shaped(advantages * mask, returns, kl, rlhf_reward)
