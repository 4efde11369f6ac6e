"""The hand-written PPO gradients of rlhfkit.gym.fastgrad against autograd on rlhfkit.losses.ppo."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.gym.common import sample_categorical
from rlhfkit.gym.fastgrad import FlatParams, PPOGrad
from rlhfkit.gym.mappo import MAActorCritic
from rlhfkit.gym.ppo import ActorCritic, PPOUpdateConfig, _autograd_loss_and_grad


def _net(activation: str = "tanh", shared: bool = False) -> dict:
    return {"hidden": [16, 8], "activation": activation, "shared": shared, "ortho_init": True, "log_std_init": -0.3}


def _batch(agent: torch.nn.Module, n: int, obs_dim: int, box: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A minibatch whose ratios and values straddle both clip ranges, so every branch of the gradient runs."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g)
    with torch.no_grad():
        out, values = agent(obs)
        if box:
            actions = out + torch.randn(out.shape, generator=g)
        else:
            actions = torch.randint(0, out.shape[-1], (n,), generator=g)
        logp = agent.log_prob(out, actions)
    return {"obs": obs, "actions": actions, "old_logp": logp + 0.4 * torch.randn(n, generator=g),
            "adv": torch.randn(n, generator=g), "old_values": values + 0.5 * torch.randn(n, generator=g),
            "returns": values + torch.randn(n, generator=g)}


def _both(agent: torch.nn.Module, b: dict[str, torch.Tensor], p: PPOUpdateConfig) -> tuple:
    flat = FlatParams(agent)
    fast = PPOGrad.build(agent, flat)
    assert fast is not None
    st_fast = fast.loss_and_grad(b["obs"], b["actions"], b["old_logp"], b["adv"], b["old_values"], b["returns"],
                                 clip_range=p.clip_range, clip_range_vf=p.clip_range_vf, ent_coef=p.ent_coef,
                                 vf_coef=p.vf_coef)
    g_fast = flat.grad.clone()
    flat.grad.fill_(float("nan"))  # the autograd path must overwrite every entry
    st_ref = _autograd_loss_and_grad(agent, flat, b["obs"], b["actions"], b["old_logp"], b["adv"], b["old_values"],
                                     b["returns"], p)
    return st_fast, g_fast, st_ref, flat.grad.clone()


@pytest.mark.parametrize("kind", ["discrete", "box"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("ent_coef,clip_vf", [(0.0, 0.0), (0.05, 0.2)])
def test_gradients_match_autograd(kind: str, activation: str, ent_coef: float, clip_vf: float) -> None:
    torch.manual_seed(0)
    agent = ActorCritic(5, kind, 3, _net(activation))
    b = _batch(agent, 64, 5, kind == "box")
    p = PPOUpdateConfig(clip_range=0.2, clip_range_vf=clip_vf, ent_coef=ent_coef, vf_coef=0.7)
    st_fast, g_fast, st_ref, g_ref = _both(agent, b, p)
    # the batch really exercises the clipped branches (else the test would not test them)
    assert 0.05 < float(st_ref[4]) < 0.95
    if clip_vf:
        assert 0.05 < float(st_ref[5]) < 0.95
    torch.testing.assert_close(st_fast, st_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)
    assert g_fast.abs().sum() > 0


def test_value_clipping_inside_the_range_keeps_its_gradient() -> None:
    """Old values close to the new ones: V_old + (V - V_old) rounds away from V for a few samples, so the
    clipped term can win inside the clip range, where autograd still passes the gradient through."""
    for seed in range(40):
        torch.manual_seed(seed)
        agent = ActorCritic(5, "box", 3, _net())
        b = _batch(agent, 256, 5, box=True, seed=seed)
        with torch.no_grad():
            b["old_values"] = agent(b["obs"])[1] + 0.05 * torch.randn(256)
            b["returns"] = b["old_values"] + 2.0 * torch.randn(256)
        st_fast, g_fast, st_ref, g_ref = _both(agent, b, PPOUpdateConfig(clip_range_vf=0.2))
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)


def test_mappo_agent_slices_inputs() -> None:
    torch.manual_seed(1)
    agent = MAActorCritic(actor_dim=6, critic_dim=10, n_actions=5, n_agents=2, critic="centralized", net=_net())
    b = _batch(agent, 48, 16, box=False)
    st_fast, g_fast, st_ref, g_ref = _both(agent, b, PPOUpdateConfig(ent_coef=0.01))
    torch.testing.assert_close(st_fast, st_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)


def test_forward_matches_module() -> None:
    for kind in ("discrete", "box"):
        agent = ActorCritic(4, kind, 2, _net())
        fast = PPOGrad.build(agent, FlatParams(agent))
        x = torch.randn(7, 4)
        with torch.no_grad():
            ref = agent(x)
        for a, b in zip(fast.forward(x), ref):
            torch.testing.assert_close(a, b)


def test_shared_trunk_falls_back_to_autograd() -> None:
    agent = ActorCritic(4, "discrete", 2, _net(shared=True))
    assert PPOGrad.build(agent, FlatParams(agent)) is None


def test_flat_params_are_the_module_parameters() -> None:
    torch.manual_seed(2)
    agent = ActorCritic(3, "box", 2, _net())
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    flat = FlatParams(agent)
    assert {k: v for k, v in agent.state_dict().items()}.keys() == before.keys()
    for k, v in agent.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # an optimizer step on the flat tensor moves the module's parameters
    flat.grad.normal_()
    torch.optim.SGD([flat.param], lr=0.1).step()
    assert all(not torch.equal(v, before[k]) for k, v in agent.state_dict().items())
    # loading a state dict writes through to the flat tensor
    agent.load_state_dict(before)
    torch.testing.assert_close(flat.param.detach(), torch.cat([before[k].reshape(-1) for k in before]))


def test_clip_grad_norm_matches_torch() -> None:
    agent = ActorCritic(3, "discrete", 2, _net())
    flat = FlatParams(agent)
    flat.grad.normal_()
    ref = [flat.grads[x].clone().requires_grad_(False) for x in flat.params]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for x, g in zip(params, ref):
        x.grad = g
    ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    norm = flat.clip_grad_norm_(0.5)
    torch.testing.assert_close(norm, ref_norm)
    torch.testing.assert_close(flat.grad, torch.cat([x.grad.reshape(-1) for x in params]))
    flat.grad.fill_(0.01)
    flat.clip_grad_norm_(0.0)  # 0 = off
    assert torch.all(flat.grad == 0.01)


def test_sample_categorical_frequencies() -> None:
    torch.manual_seed(3)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25]])
    logp = probs.log().expand(50_000, 2, 4)
    a = sample_categorical(logp)
    assert a.shape == (50_000, 2) and a.min() >= 0 and a.max() <= 3
    for row in range(2):
        freq = torch.bincount(a[:, row], minlength=4).float() / 50_000
        torch.testing.assert_close(freq, probs[row], atol=0.01, rtol=0)
    assert not (a[:, 0] == 1).any()  # a zero-probability action is never drawn


def test_a_diverged_update_stops_with_a_clear_error() -> None:
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.gym.common import make_adam
    from rlhfkit.gym.ppo import Batch, ppo_update
    from rlhfkit.runtime.distributed import DistInfo

    agent = ActorCritic(4, "discrete", 2, _net())
    flat = FlatParams(agent)
    n = 32
    b = Batch(torch.randn(n, 4), torch.randint(0, 2, (n,)), torch.zeros(n), torch.randn(n),
              torch.full((n,), float("inf")), torch.zeros(n))
    with pytest.raises(RlhfkitError, match="diverged: non-finite train/value_loss"):
        ppo_update(agent, flat, make_adam([flat.param], 1e-3), b, PPOUpdateConfig(epochs=1, minibatches=1),
                   DistInfo(), PPOGrad.build(agent, flat))
