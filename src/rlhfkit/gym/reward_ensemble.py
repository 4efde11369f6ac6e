"""A reward model learned from preferences between trajectory segments (Christiano et al. 2017, sec. 2.2).

Each member r_k is a small MLP on (observation, action) features (or the observation alone). A segment
sigma = (s_0, a_0, ..., s_{L-1}, a_{L-1}) scores R_k(sigma) = sum_t r_k(s_t, a_t), and the probability
that sigma^1 is preferred over sigma^2 is Bradley-Terry on the sums (eq. 1):

    P_k[sigma^1 > sigma^2] = exp R_k(sigma^1) / (exp R_k(sigma^1) + exp R_k(sigma^2)) = sigmoid(R_k^1 - R_k^2)

Members are fit to the labels mu in {1, 0, 0.5} (a tie trains toward 1/2) by the cross-entropy

    loss_k = -mean[ mu log P_k + (1 - mu) log(1 - P_k) ]

each on its own bootstrap resample of the labeled pairs, with weight decay. The reward handed to PPO is
the members' mean, scaled by the running std of what it handed out so far (`normalize="std"`; with
"meanstd" also centered): centering would erase a constant alive-bonus, which is what separates a
segment that ended early (a pole that fell) from one that did not. Disagreement between members (the
std of their P) picks the most informative pairs to ask about (sec. 2.2.4).

Segments may differ in length (an episode that terminated inside one is shorter): sums run over the
real steps only (`mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlhfkit.gym.common import RunningMeanStd, mlp


def preference_loss(r1: torch.Tensor, r2: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry cross-entropy over segment returns: r1, r2 (B,) summed rewards, mu (B,) the label
    (1: the first preferred, 0: the second, 0.5: a tie). Mean over the batch."""
    d = r1 - r2
    return -(mu * torch.nn.functional.logsigmoid(d) + (1 - mu) * torch.nn.functional.logsigmoid(-d)).mean()


@dataclass
class Segments:
    """A batch of segments, padded to the longest: x (B, L, F) features, mask (B, L) 1 on real steps."""

    x: torch.Tensor
    mask: torch.Tensor


class RewardEnsemble(torch.nn.Module):
    """k reward MLPs over features of (obs, action); `features` builds them (one-hot for discrete)."""

    def __init__(self, obs_dim: int, action_kind: str, action_dim: int, *, members: int = 3,
                 hidden: list[int] | None = None, use_action: bool = True, seed: int = 0):
        super().__init__()
        self.obs_dim, self.action_kind, self.action_dim, self.use_action = obs_dim, action_kind, action_dim, use_action
        self.in_dim = obs_dim + (action_dim if use_action else 0)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.members = torch.nn.ModuleList(
                mlp([self.in_dim, *(hidden or [64, 64]), 1], "relu", 1.0, ortho=False) for _ in range(members))
        self.rms = RunningMeanStd()

    def features(self, obs: np.ndarray | torch.Tensor, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., obs_dim) observations and (...) discrete / (..., action_dim) Box actions -> (..., in_dim)."""
        obs = torch.as_tensor(obs, dtype=torch.float32)
        if not self.use_action:
            return obs
        actions = torch.as_tensor(actions)
        if self.action_kind == "discrete":
            a = torch.nn.functional.one_hot(actions.long(), self.action_dim).float()
        else:
            a = actions.float().reshape(*obs.shape[:-1], self.action_dim)
        return torch.cat([obs, a], -1)

    def member_rewards(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (k, ...) per-step rewards of every member."""
        return torch.stack([m(x).squeeze(-1) for m in self.members])

    def segment_returns(self, seg: Segments) -> torch.Tensor:
        """(k, B) summed rewards of each member over each segment's real steps."""
        return (self.member_rewards(seg.x) * seg.mask).sum(-1)

    @torch.no_grad()
    def reward(self, x: torch.Tensor, normalize: str = "std", update: bool = True) -> np.ndarray:
        """The reward PPO sees for (..., in_dim) features: the members' mean, scaled by the running std
        of the rewards handed out (and centered with "meanstd"; "none": raw). `update` adds x's rewards
        to the running statistics first."""
        r = self.member_rewards(x).mean(0).numpy().astype(np.float64)
        if update:
            self.rms.update(r.reshape(-1))
        if normalize == "none":
            return r.astype(np.float32)
        std = np.sqrt(self.rms.var) + 1e-8
        centered = r - self.rms.mean if normalize == "meanstd" else r
        return (centered / std).astype(np.float32)

    @torch.no_grad()
    def disagreement(self, a: Segments, b: Segments) -> torch.Tensor:
        """(B,) std over members of P[a > b]: high where the members disagree (worth asking about)."""
        p = torch.sigmoid(self.segment_returns(a) - self.segment_returns(b))
        return p.std(0) if len(self.members) > 1 else torch.zeros(p.shape[1])

    @torch.no_grad()
    def accuracy(self, a: Segments, b: Segments, mu: torch.Tensor) -> float:
        """Share of decided pairs (mu != 0.5) the ensemble mean orders like the label."""
        decided = mu != 0.5
        if not decided.any():
            return float("nan")
        d = (self.segment_returns(a) - self.segment_returns(b)).mean(0)
        return float(((d > 0).float() == mu)[decided].float().mean())


def fit(ensemble: RewardEnsemble, optimizers: list[torch.optim.Optimizer], a: Segments, b: Segments,
        mu: torch.Tensor, *, epochs: int, batch_size: int, generator: torch.Generator) -> float:
    """`epochs` passes for each member over its own bootstrap resample of the pairs (drawn anew each
    call); returns the mean training loss of the last pass."""
    with torch.enable_grad():  # also when called inside a no_grad rollout
        return _fit(ensemble, optimizers, a, b, mu, epochs, batch_size, generator)


def _fit(ensemble: RewardEnsemble, optimizers: list[torch.optim.Optimizer], a: Segments, b: Segments,
         mu: torch.Tensor, epochs: int, batch_size: int, generator: torch.Generator) -> float:
    n = mu.numel()
    losses = []
    for member, opt in zip(ensemble.members, optimizers):
        sample = torch.randint(n, (n,), generator=generator)  # bootstrap: n pairs drawn with replacement
        for _ in range(epochs):
            order = sample[torch.randperm(n, generator=generator)]
            last = []
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                r1 = (member(a.x[idx]).squeeze(-1) * a.mask[idx]).sum(-1)
                r2 = (member(b.x[idx]).squeeze(-1) * b.mask[idx]).sum(-1)
                loss = preference_loss(r1, r2, mu[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last.append(float(loss.detach()))
        losses.append(sum(last) / len(last))
    return sum(losses) / len(losses)


def pad_segments(xs: list[torch.Tensor]) -> Segments:
    """Segments of (L_i, F) features -> one padded batch."""
    longest = max(x.shape[0] for x in xs)
    x = torch.zeros(len(xs), longest, xs[0].shape[-1])
    mask = torch.zeros(len(xs), longest)
    for i, s in enumerate(xs):
        x[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1.0
    return Segments(x, mask)
