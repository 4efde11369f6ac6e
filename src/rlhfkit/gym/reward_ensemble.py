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

Rated segments (`feedback.mode=rate`: a score per clip instead of a comparison) are fit by regression
instead: each member's segment sum R_k(sigma) to the score standardized over the labels so far,
z = (s - mean(s)) / std(s), up to a constant (a score's zero point is arbitrary, as a comparison's is):

    e = R_k(sigma) - z,    loss_k = mean[ (e - mean(e))^2 ]   (over the batch)

Without the free constant, centered targets would force segment sums of opposite sign for short and long
segments of the same states (a CartPole clip that ended early must score lower; with a constant it
simply sums fewer positive steps). Disagreement is then the members' spread (std) of R_k(sigma).

Segments may differ in length (an episode that terminated inside one is shorter): sums run over the
real steps only (`mask`).

A trained ensemble is saved as `reward_model/` (model.safetensors + reward_model.json) and read back
with `load_reward_model(folder)`; `ensemble.score(obs, actions)` gives the per-step learned reward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.gym.agents import read_json
from rlhfkit.gym.common import RunningMeanStd, mlp


def preference_loss(r1: torch.Tensor, r2: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry cross-entropy over segment returns: r1, r2 (B,) summed rewards, mu (B,) the label
    (1: the first preferred, 0: the second, 0.5: a tie). Mean over the batch."""
    d = r1 - r2
    return -(mu * torch.nn.functional.logsigmoid(d) + (1 - mu) * torch.nn.functional.logsigmoid(-d)).mean()


def rating_loss(r: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error between segment returns r (B,) and standardized scores (B,) up to one constant
    shift: the variance of the residuals over the batch."""
    e = r - target
    return ((e - e.mean()) ** 2).mean()


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores on the people's scale -> zero mean, unit std over the labels given (all zero for one label
    or equal scores: nothing to tell apart yet)."""
    if scores.numel() < 2 or float(scores.std()) == 0.0:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std()


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
    def reward(self, x: torch.Tensor, normalize: str = "std", update: bool = True, info: Any = None) -> np.ndarray:
        """The reward PPO sees for (..., in_dim) features: the members' mean, scaled by the running std
        of the rewards handed out (and centered with "meanstd"; "none": raw). `update` adds x's rewards
        to the running statistics first (merged over ranks when `info` says torchrun)."""
        r = self.member_rewards(x).mean(0).numpy().astype(np.float64)
        if update:
            self.rms.update(r.reshape(-1), info)
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
    def spread(self, seg: Segments) -> torch.Tensor:
        """(B,) std over members of their segment returns: where a rating is worth asking (every member is
        fit to the same standardized scores, so their returns share a scale)."""
        r = self.segment_returns(seg)
        return r.std(0) if len(self.members) > 1 else torch.zeros(r.shape[1])

    @torch.no_grad()
    def correlation(self, seg: Segments, scores: torch.Tensor) -> float:
        """Pearson correlation between the ensemble's mean segment returns and the scores given."""
        if scores.numel() < 3:
            return float("nan")
        r = self.segment_returns(seg).mean(0).double().numpy()
        s = scores.double().numpy()
        if r.std() == 0 or s.std() == 0:
            return float("nan")
        return float(np.corrcoef(r, s)[0, 1])

    @torch.no_grad()
    def score(self, obs: np.ndarray | torch.Tensor, actions: np.ndarray | torch.Tensor | None = None,
              normalize: str = "none") -> np.ndarray:
        """The learned reward of each step: obs (..., obs_dim) raw observations, actions (...) or
        (..., action_dim) (ignored, may be None, when the model reads observations only). `normalize`
        "std"/"meanstd" scales like the reward PPO saw at the end of training; "none" is the members' mean."""
        if self.use_action and actions is None:
            raise RlhfkitError("this reward model reads (observation, action): pass the actions too")
        obs = torch.as_tensor(obs, dtype=torch.float32)
        if obs.shape[-1] != self.obs_dim:
            raise RlhfkitError(f"expected observations with {self.obs_dim} values in the last dimension, got "
                               f"shape {tuple(obs.shape)}")
        x = self.features(obs, actions if actions is not None else torch.zeros(obs.shape[:-1]))
        return self.reward(x, normalize, update=False)

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
    def loss(member: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        r1 = (member(a.x[idx]).squeeze(-1) * a.mask[idx]).sum(-1)
        r2 = (member(b.x[idx]).squeeze(-1) * b.mask[idx]).sum(-1)
        return preference_loss(r1, r2, mu[idx])

    return _fit(ensemble, optimizers, mu.numel(), loss, epochs, batch_size, generator)


def fit_ratings(ensemble: RewardEnsemble, optimizers: list[torch.optim.Optimizer], seg: Segments,
                scores: torch.Tensor, *, epochs: int, batch_size: int, generator: torch.Generator) -> float:
    """Regression of each member's segment sums on the standardized scores, bootstrap per member as in
    `fit`; returns the mean training loss of the last pass."""
    target = standardize(scores.float())

    def loss(member: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return rating_loss((member(seg.x[idx]).squeeze(-1) * seg.mask[idx]).sum(-1), target[idx])

    return _fit(ensemble, optimizers, scores.numel(), loss, epochs, batch_size, generator)


def _fit(ensemble: RewardEnsemble, optimizers: list[torch.optim.Optimizer], n: int,
         batch_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], epochs: int, batch_size: int,
         generator: torch.Generator) -> float:
    losses = []
    with torch.enable_grad():  # also when called inside a no_grad rollout
        for member, opt in zip(ensemble.members, optimizers):
            sample = torch.randint(n, (n,), generator=generator)  # bootstrap: n labels drawn with replacement
            for _ in range(epochs):
                order = sample[torch.randperm(n, generator=generator)]
                last = []
                for start in range(0, n, batch_size):
                    loss = batch_loss(member, order[start : start + batch_size])
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


SPEC = "reward_model.json"


def save_reward_model(ensemble: RewardEnsemble, folder: Path, **extra: Any) -> None:
    """Weights as safetensors, everything needed to rebuild (and the scale PPO saw) as JSON."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ensemble.state_dict().items()}, str(folder / "model.safetensors"))
    hidden = [m.out_features for m in ensemble.members[0] if isinstance(m, torch.nn.Linear)][:-1]
    spec = {"type": "segment-reward-ensemble", "obs_dim": ensemble.obs_dim, "action_kind": ensemble.action_kind,
            "action_dim": ensemble.action_dim, "members": len(ensemble.members), "hidden": hidden,
            "use_action": ensemble.use_action, "rms": ensemble.rms.state_dict(), **extra}
    (folder / SPEC).write_text(json.dumps(spec, indent=2))


def load_reward_model(folder: str | Path) -> RewardEnsemble:
    """A `gym rlhf` run's reward_model/ folder (or the run folder) -> the ensemble, in eval mode."""
    folder = Path(folder)
    if not (folder / SPEC).is_file() and (folder / "reward_model" / SPEC).is_file():
        folder = folder / "reward_model"
    path = folder / SPEC
    if not path.is_file():
        raise RlhfkitError(f"{folder}: no {SPEC}; expected the reward_model/ folder of an `rlhfkit gym rlhf` run")
    spec = read_json(path)
    try:
        ensemble = RewardEnsemble(int(spec["obs_dim"]), str(spec["action_kind"]), int(spec["action_dim"]),
                                  members=int(spec["members"]), hidden=[int(h) for h in spec["hidden"]],
                                  use_action=bool(spec["use_action"]))
        ensemble.rms.load_state_dict(spec["rms"])
    except KeyError as exc:
        raise RlhfkitError(f"{path}: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise RlhfkitError(f"{path}: a field has the wrong type or value ({exc})") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise RlhfkitError(f"{folder}: no model.safetensors next to {SPEC}")
    from safetensors.torch import load_file

    try:
        ensemble.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # a truncated or foreign file, or shapes that differ from the JSON
        raise RlhfkitError(f"{weights}: cannot load the weights: {exc}") from None
    return ensemble.eval()
