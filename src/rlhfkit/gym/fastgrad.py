"""The PPO update of MLP actor-critics with hand-written gradients, and parameters in one flat buffer.

Control-task networks are tiny (two 64-unit layers), so on a CPU an update step costs what PyTorch's
per-operation overhead costs, not arithmetic: autograd's graph, `torch.optim.Adam` walking a dozen
tensors, `clip_grad_norm_` computing a dozen norms. Here the forward pass keeps what the backward pass
needs, the gradient of the clipped PPO loss is written out (the formulas are in `PPOGrad.loss_and_grad`)
and lands directly in one flat gradient buffer, so clipping is one norm, Adam steps one tensor, and
DD-PPO's all-reduce is one call. `tests/test_gym_fastgrad.py` checks every gradient against autograd on
the same loss (`rlhfkit.losses.ppo`), which stays the reference and the fallback for other networks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class FlatParams:
    """Every parameter of `module` re-pointed into one contiguous buffer, with a gradient buffer of the
    same layout. The module keeps its parameters (state dicts and checkpoints are unchanged); optimize
    `self.param` instead of `module.parameters()`. Create it after moving the module to its device."""

    def __init__(self, module: torch.nn.Module):
        self.params = [x for x in module.parameters() if x.requires_grad]
        with torch.no_grad():
            flat = torch.cat([x.detach().reshape(-1) for x in self.params])
        self.param = torch.nn.Parameter(flat)
        self.param.grad = torch.zeros_like(flat)
        self.grads: dict[torch.Tensor, torch.Tensor] = {}
        offset = 0
        for x in self.params:
            n = x.numel()
            x.data = self.param.data[offset : offset + n].view_as(x)
            self.grads[x] = self.param.grad[offset : offset + n].view_as(x)
            offset += n

    @property
    def grad(self) -> torch.Tensor:
        return self.param.grad  # type: ignore[return-value]

    def gather_grads(self) -> None:
        """Copy gradients that autograd left in the parameters' `.grad` into the flat buffer."""
        for x in self.params:
            if x.grad is None:
                self.grads[x].zero_()
            else:
                self.grads[x].copy_(x.grad)
                x.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` on the flat gradient (max_norm 0 = off); returns the norm."""
        norm = torch.linalg.vector_norm(self.grad)
        if max_norm:
            self.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm


class MLPGrad:
    """Forward and backward of an `rlhfkit.gym.common.mlp` (Linear layers with Tanh or ReLU between)."""

    def __init__(self, seq: torch.nn.Sequential, flat: FlatParams):
        self.linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
        acts = {type(m) for m in seq if not isinstance(m, torch.nn.Linear)}
        if not acts <= {torch.nn.Tanh, torch.nn.ReLU} or len(acts) > 1 or len(seq) != 2 * len(self.linears) - 1:
            raise ValueError("not a Linear/activation MLP")
        self.tanh = acts != {torch.nn.ReLU}
        self.grads = [(flat.grads[m.weight], flat.grads[m.bias]) for m in self.linears]

    def forward(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Output of the network; `keep` receives the input of every Linear (what backward needs)."""
        last = len(self.linears) - 1
        for i, m in enumerate(self.linears):
            if keep is not None:
                keep.append(x)
            x = torch.addmm(m.bias, x, m.weight.t())
            if i < last:
                x = torch.tanh(x) if self.tanh else torch.relu(x)
        return x

    def backward(self, grad_out: torch.Tensor, kept: list[torch.Tensor]) -> None:
        """Write d loss / d (weights, biases) into the flat gradient buffer, given d loss / d output."""
        d = grad_out
        for i in range(len(self.linears) - 1, -1, -1):
            gw, gb = self.grads[i]
            torch.mm(d.t(), kept[i], out=gw)
            torch.sum(d, 0, out=gb)
            if i:
                dh = torch.mm(d, self.linears[i].weight)
                h = kept[i]  # the activation's output
                d = torch.ops.aten.tanh_backward(dh, h) if self.tanh else torch.ops.aten.threshold_backward(dh, h, 0)


class PPOGrad:
    """Loss and hand-written gradient of PPO for an agent made of an actor MLP and a critic MLP.

    The agent describes itself with `grad_parts()`: (actor Sequential, critic Sequential, actor input
    slice, critic input slice), or None when it is something else (a shared trunk): then `build` returns
    None and the caller uses autograd."""

    def __init__(self, agent: Any, flat: FlatParams, parts: tuple[Any, Any, slice, slice]):
        actor, critic, self.actor_in, self.critic_in = parts
        self.actor, self.critic = MLPGrad(actor, flat), MLPGrad(critic, flat)
        self.box = getattr(agent, "action_kind", "discrete") == "box"
        self.log_std = agent.log_std if self.box else None
        self.log_std_grad = flat.grads[agent.log_std] if self.box else None

    @classmethod
    def build(cls, agent: Any, flat: FlatParams) -> PPOGrad | None:
        parts = agent.grad_parts() if hasattr(agent, "grad_parts") else None
        if parts is None:
            return None
        try:
            return cls(agent, flat, parts)
        except ValueError:
            return None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs of every action or the Gaussian mean, value): the agent's forward without modules."""
        out = self.actor.forward(x[:, self.actor_in])
        if not self.box:
            out = torch.log_softmax(out, dim=-1)
        return out, self.critic.forward(x[:, self.critic_in]).squeeze(-1)

    @torch.no_grad()
    def loss_and_grad(self, x: torch.Tensor, actions: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      old_values: torch.Tensor, returns: torch.Tensor, *, clip_range: float, clip_range_vf: float,
                      ent_coef: float, vf_coef: float) -> torch.Tensor:
        """Fill the flat gradient with d/d params of

            loss = pg_loss - ent_coef * entropy + vf_coef * v_loss

        (the losses of `rlhfkit.losses.ppo`, means over the minibatch) and return the detached stats
        [pg_loss, v_loss, entropy, approx_kl, clipfrac, value_clipfrac].

        With n samples, r = exp(logp - old_logp): pg_loss = mean(max(-A r, -A clip(r))). Where the
        unclipped term is the larger one, d/dr = -A/n; where the clipped one is strictly larger, r is
        outside the clip range and d/dr = 0. Then d/d logp = r * d/dr. Categorical: d logp_a / d z =
        onehot(a) - p, and d entropy / d z = -p (log p + H). Gaussian (mean m, log std s, z = (a - m)/e^s):
        d logp / d m = z / e^s, d logp / d s = z^2 - 1, d entropy / d s = 1. Value: 0.5 mean(max((V-R)^2,
        (V_clip-R)^2)) gives (V - R)/n where the unclipped term wins; where the clipped one wins,
        (V_clip - R)/n if |V - V_old| is inside the clip range (V_clip = V_old + (V - V_old) can round
        away from V there) and 0 outside it.
        """
        n = x.shape[0]
        kept_a: list[torch.Tensor] = []
        kept_c: list[torch.Tensor] = []
        out = self.actor.forward(x[:, self.actor_in], kept_a)
        values = self.critic.forward(x[:, self.critic_in], kept_c).squeeze(-1)
        if self.box:
            inv_std = torch.exp(-self.log_std)
            z = (actions - out) * inv_std
            logp = (-0.5 * z.square() - self.log_std - _HALF_LOG_2PI).sum(-1)
            entropy = (0.5 + _HALF_LOG_2PI + self.log_std).sum()
        else:
            logp_all = torch.log_softmax(out, dim=-1)
            idx = actions.long().unsqueeze(-1)
            logp = logp_all.gather(-1, idx).squeeze(-1)
            probs = logp_all.exp()
            ent_each = -(probs * logp_all).sum(-1)
            entropy = ent_each.mean()
        logratio = logp - old_logp
        ratio = torch.exp(logratio)
        s1 = -adv * ratio
        s2 = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        pg_loss = torch.maximum(s1, s2).mean()
        clipped = s2 > s1
        g_logp = torch.where(clipped, 0.0, -adv / n) * ratio
        if self.box:
            g_out = (g_logp.unsqueeze(-1) * z) * inv_std
            g_s = (g_logp.unsqueeze(-1) * (z.square() - 1.0)).sum(0)
            self.log_std_grad.copy_(g_s - ent_coef)  # type: ignore[union-attr]
        else:
            g_out = probs * -g_logp.unsqueeze(-1)
            g_out.scatter_add_(-1, idx, g_logp.unsqueeze(-1))
            if ent_coef:
                g_out += (ent_coef / n) * probs * (logp_all + ent_each.unsqueeze(-1))
        err = values - returns
        sq = err.square()
        if clip_range_vf:
            v_clipped = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
            sq_clipped = (v_clipped - returns).square()
            v_clip = sq_clipped > sq
            v_loss = 0.5 * torch.maximum(sq, sq_clipped).mean()
            # Where the clipped term wins, its gradient flows through the clamp only inside the range
            # (V_clip can differ from V by rounding there).
            inside = (values - old_values).abs() <= clip_range_vf
            g_v = torch.where(v_clip, (v_clipped - returns) * inside, err) * (vf_coef / n)
            v_clipfrac = v_clip.float().mean()
        else:
            v_loss = 0.5 * sq.mean()
            g_v = err * (vf_coef / n)
            v_clipfrac = torch.zeros((), device=x.device)
        self.actor.backward(g_out, kept_a)
        self.critic.backward(g_v.unsqueeze(-1), kept_c)
        approx_kl = ((ratio - 1.0) - logratio).mean()
        return torch.stack([pg_loss, v_loss, entropy, approx_kl, clipped.float().mean(), v_clipfrac])
