"""RL maths (GAE, whitening, RLOO/GRPO, running moments, KL, PPO losses) against hand-computed numbers and
naive float64 reference loops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhfkit.losses.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
)
from rlhfkit.rl.advantages import (
    RunningMoments,
    gae,
    grpo_advantages,
    masked_mean,
    masked_var,
    rloo_advantages,
    token_gae,
    whiten,
)
from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- GAE


def naive_gae(rewards, values, next_values, terminated, episode_end, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, summed forward until the episode ends (float64, per env)."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        for t0 in range(T):
            acc, coef = 0.0, 1.0
            for u in range(t0, T):
                delta = rewards[u][n] + gamma * next_values[u][n] * (1 - terminated[u][n]) - values[u][n]
                acc += coef * delta
                if episode_end[u][n]:
                    break
                coef *= gamma * lam
            adv[t0][n] = acc
    return adv


def _rollout(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T, N = 7, 3
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    # next value inside an episode is the next step's value; after an episode end it is the value of
    # the real final observation (used only when truncated); at the rollout end a bootstrap value.
    next_values = torch.cat([values[1:], torch.randn(1, N, generator=g, dtype=torch.float64)])
    terminated = torch.zeros(T, N, dtype=torch.float64)
    truncated = torch.zeros(T, N, dtype=torch.float64)
    terminated[2, 0], truncated[5, 0] = 1, 1  # env 0: terminal at t=2, time limit at t=5
    truncated[1, 1], terminated[4, 1] = 1, 1  # env 1: time limit at t=1, terminal at t=4
    truncated[3, 2] = 1  # env 2: time limit at t=3; env 2 runs past the rollout end
    for tt, n in [(2, 0), (5, 0), (1, 1), (4, 1), (3, 2)]:
        next_values[tt, n] = 100.0 + 10 * tt + n  # distinctive final-observation values
    episode_end = torch.maximum(terminated, truncated)
    return rewards, values, next_values, terminated, episode_end


@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_naive_loop_with_terminations_and_truncations(gamma: float, lam: float) -> None:
    rewards, values, next_values, terminated, episode_end = _rollout()
    expected = torch.tensor(naive_gae(rewards.tolist(), values.tolist(), next_values.tolist(),
                                      terminated.tolist(), episode_end.tolist(), gamma, lam), dtype=torch.float64)
    adv, ret = gae(rewards.float(), values.float(), next_values.float(), terminated.float(), episode_end.float(),
                   gamma=gamma, lam=lam)
    assert adv.shape == (7, 3) and adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ret, adv + values.float())
    # float64 in, float64 out, tight match
    adv64, _ = gae(rewards, values, next_values, terminated, episode_end, gamma=gamma, lam=lam)
    assert adv64.dtype == torch.float64
    torch.testing.assert_close(adv64, expected, atol=1e-12, rtol=1e-12)


def test_gae_truncation_bootstraps_and_termination_does_not() -> None:
    rewards, values, next_values, terminated, episode_end = _rollout()
    adv, _ = gae(rewards, values, next_values, terminated, episode_end, gamma=0.9, lam=0.8)
    # terminal step (env 0, t=2): delta only, final-observation value ignored
    assert adv[2, 0].item() == pytest.approx(rewards[2, 0].item() - values[2, 0].item(), abs=1e-12)
    # truncated step (env 2, t=3): bootstrap from the final observation's value, nothing beyond
    expected = rewards[3, 2].item() + 0.9 * next_values[3, 2].item() - values[3, 2].item()
    assert adv[3, 2].item() == pytest.approx(expected, abs=1e-12)


def test_gae_hand_computed_three_steps_with_truncation() -> None:
    # One env. t=0 -> t=1 inside the episode; t=1 is truncated (final observation worth 4.0);
    # t=2 starts a new episode cut by the rollout end, bootstrapped with 2.0.
    rewards = t(1.0, 2.0, 3.0).unsqueeze(1)
    values = t(0.5, 1.0, 1.5).unsqueeze(1)
    next_values = t(1.0, 4.0, 2.0).unsqueeze(1)
    terminated = t(0, 0, 0).unsqueeze(1)
    episode_end = t(0, 1, 0).unsqueeze(1)
    adv, ret = gae(rewards, values, next_values, terminated, episode_end, gamma=0.9, lam=0.8)
    # delta2 = 3 + 0.9*2 - 1.5 = 3.3;  A2 = 3.3
    # delta1 = 2 + 0.9*4 - 1.0 = 4.6;  A1 = 4.6 (episode ends: A2 not added)
    # delta0 = 1 + 0.9*1 - 0.5 = 1.4;  A0 = 1.4 + 0.9*0.8*4.6 = 4.712
    torch.testing.assert_close(adv.squeeze(1), t(4.712, 4.6, 3.3))
    torch.testing.assert_close(ret.squeeze(1), t(5.212, 5.6, 4.8))
    # the same step 1 as a terminal state: no bootstrap, delta1 = 2 - 1 = 1, A0 = 1.4 + 0.72 = 2.12
    adv_term, _ = gae(rewards, values, next_values, episode_end, episode_end, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_term.squeeze(1), t(2.12, 1.0, 3.3))


def test_gae_does_not_cross_episode_end() -> None:
    rewards, values, next_values, terminated, episode_end = _rollout()
    adv, _ = gae(rewards, values, next_values, terminated, episode_end, gamma=0.99, lam=0.95)
    # env 0 ends at t=2; change everything after it: advantages up to t=2 must not move
    r2, v2 = rewards.clone(), values.clone()
    r2[3:, 0] += 50.0
    v2[3:, 0] -= 7.0
    nv2 = next_values.clone()
    nv2[3:, 0] += 3.0
    adv2, _ = gae(r2, v2, nv2, terminated, episode_end, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv2[:3, 0], adv[:3, 0])
    assert not torch.allclose(adv2[3:, 0], adv[3:, 0])
    torch.testing.assert_close(adv2[:, 1:], adv[:, 1:])  # other envs untouched


def test_gae_does_not_modify_inputs_and_checks_shapes() -> None:
    inputs = _rollout()
    copies = [x.clone() for x in inputs]
    gae(*inputs, gamma=0.99, lam=0.95)
    for a, b in zip(inputs, copies, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="values"):
        gae(inputs[0], inputs[1][:-1], *inputs[2:], gamma=0.99, lam=0.95)


# ---------------------------------------------------------------- token GAE


def naive_token_gae(rewards, values, lengths, gamma, lam):
    B, L = len(rewards), len(rewards[0])
    adv = [[0.0] * L for _ in range(B)]
    for b in range(B):
        n, last = lengths[b], 0.0
        for i in reversed(range(n)):
            next_v = values[b][i + 1] if i + 1 < n else 0.0  # terminal after the last real token
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            last = delta + gamma * lam * last
            adv[b][i] = last
    return adv


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5)])
def test_token_gae_matches_per_row_loop(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(1)
    lengths = [3, 0, 6, 1, 4]  # includes an empty row and a full-length row
    B, L = len(lengths), 6
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths])
    rewards = torch.randn(B, L, generator=g)
    values = torch.randn(B, L, generator=g)
    # garbage in the padding must not leak into the result
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, float("nan")))
    values = torch.where(mask.bool(), values, torch.full_like(values, 1e9))
    adv, ret = token_gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.tensor(naive_token_gae(rewards.double().tolist(), values.double().tolist(), lengths, gamma, lam))
    torch.testing.assert_close(adv.double(), expected.double(), atol=1e-5, rtol=1e-5)
    real = mask.bool()
    assert torch.equal(adv[~real], torch.zeros_like(adv[~real]))
    assert torch.equal(ret[~real], torch.zeros_like(ret[~real]))
    torch.testing.assert_close(ret[real], (adv + values)[real])


def test_token_gae_hand_computed_and_mask_check() -> None:
    # one row of 2 tokens, reward only at the end (gamma=1, lam=0.5):
    # delta1 = 1 - 0.5 = 0.5, A1 = 0.5; delta0 = 0 + 0.5 - 0.2 = 0.3, A0 = 0.3 + 0.5*0.5 = 0.55
    adv, ret = token_gae(t(0.0, 1.0, 0.0).unsqueeze(0), t(0.2, 0.5, 0.9).unsqueeze(0), t(1, 1, 0).unsqueeze(0),
                         gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv[0], t(0.55, 0.5, 0.0))
    torch.testing.assert_close(ret[0], t(0.75, 1.0, 0.0))
    with pytest.raises(ValueError, match="contiguous"):
        token_gae(torch.zeros(1, 3), torch.zeros(1, 3), t(1, 0, 1).unsqueeze(0), gamma=1.0, lam=0.95)


# ---------------------------------------------------------------- masked statistics and whitening


def test_masked_mean_and_var() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, float("inf"), 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # selected: 1, 2, 3, 4 -> mean 2.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t(2.0, 4.0))
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    assert masked_mean(x[:, :2].clone().fill_(3.0)).item() == 3.0
    # empty rows give 0, a single element gives var 0 (no nan)
    assert masked_mean(x, torch.zeros_like(mask), dim=1).tolist() == [0.0, 0.0]
    assert masked_var(x, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]])).item() == 0.0


def test_whiten_with_mask_matches_manual() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=g) * 3 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    sel = x[mask.bool()].double()
    mean, var = sel.mean(), sel.var(unbiased=True)
    expected = ((x.double() - mean) / torch.sqrt(var + 1e-8)) * mask
    out = whiten(x, mask)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~mask.bool()], torch.zeros(5))
    white = out[mask.bool()]
    assert white.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert white.std().item() == pytest.approx(1.0, abs=1e-5)
    # shift_mean=False keeps the mean, only rescales
    kept = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept.double(), (expected + mean) * mask, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept[~mask.bool()], torch.zeros(5))
    # no mask: over everything
    torch.testing.assert_close(whiten(x), (x - x.mean()) / torch.sqrt(x.var() + 1e-8))
    # a single element: 0, not nan
    assert whiten(t(5.0)).tolist() == [0.0]
    assert whiten(t(5.0, 7.0), t(1, 0)).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- RLOO / GRPO


def test_rloo_hand_computed() -> None:
    scores = t(1, 2, 3, 0, 0, 6)
    # k=3: group (1,2,3): 1 - 2.5, 2 - 2, 3 - 1.5; group (0,0,6): 0 - 3, 0 - 3, 6 - 0
    torch.testing.assert_close(rloo_advantages(scores, 3), t(-1.5, 0.0, 1.5, -3.0, -3.0, 6.0))
    # k=2: pairs (1,2), (3,0), (0,6)
    torch.testing.assert_close(rloo_advantages(scores, 2), t(-1, 1, 3, -3, -6, 6))


def test_grpo_hand_computed() -> None:
    scores = t(1, 2, 3, 0, 0, 6)
    # k=3: group 1 mean 2, std 1; group 2 mean 2, deviations (-2,-2,4), var 24/2 = 12
    eps = 1e-4
    s12 = math.sqrt(12)
    expected = t(-1 / (1 + eps), 0.0, 1 / (1 + eps), -2 / (s12 + eps), -2 / (s12 + eps), 4 / (s12 + eps))
    torch.testing.assert_close(grpo_advantages(scores, 3), expected)
    torch.testing.assert_close(grpo_advantages(scores, 3, scale=False), t(-1, 0, 1, -2, -2, 4))
    # k=2: (1,2): mean 1.5, std sqrt(0.5); (3,0): mean 1.5, std sqrt(4.5); (0,6): mean 3, std sqrt(18)
    s = [math.sqrt(0.5), math.sqrt(4.5), math.sqrt(18)]
    expected2 = t(-0.5 / (s[0] + eps), 0.5 / (s[0] + eps), 1.5 / (s[1] + eps), -1.5 / (s[1] + eps),
                  -3 / (s[2] + eps), 3 / (s[2] + eps))
    torch.testing.assert_close(grpo_advantages(scores, 2), expected2)
    # a group of equal scores: zeros, not nan
    assert grpo_advantages(t(1, 1, 1), 3).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_advantages_validate(fn) -> None:
    with pytest.raises(ValueError, match="k .*>= 2"):
        fn(t(1, 2, 3), 1)
    with pytest.raises(ValueError, match="P\\*k"):
        fn(t(1, 2, 3, 4, 5), 2)
    with pytest.raises(ValueError, match="P\\*k"):
        fn(torch.zeros(2, 2), 2)


# ---------------------------------------------------------------- running moments


def test_running_moments_match_concatenation() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(5, generator=g) * 3 + 10, torch.randn(1, generator=g), torch.empty(0),
               torch.randn(4, 4, generator=g) * 0.1 - 2, torch.randn(3, generator=g) * 50]
    rm = RunningMoments()
    assert rm.count == 0 and rm.mean == 0.0 and rm.std == 1.0
    for b in batches:
        rm.update(b)
    every = torch.cat([b.reshape(-1) for b in batches]).double()
    assert rm.count == 25
    assert rm.mean == pytest.approx(every.mean().item(), rel=1e-12, abs=1e-12)
    assert rm.std == pytest.approx(every.std(unbiased=True).item(), rel=1e-12)
    state = json.loads(json.dumps(rm.state_dict()))  # plain floats
    assert all(isinstance(v, float) for v in state.values())
    again = RunningMoments()
    again.load_state_dict(state)
    assert (again.count, again.mean, again.std) == (rm.count, rm.mean, rm.std)
    more = torch.randn(7, generator=g)
    again.update(more)
    full = torch.cat([every, more.double()])
    assert again.std == pytest.approx(full.std().item(), rel=1e-12)


def test_running_moments_single_value_std_is_one() -> None:
    rm = RunningMoments()
    rm.update(t(4.0))
    assert rm.count == 1 and rm.mean == 4.0 and rm.std == 1.0


# ---------------------------------------------------------------- KL


def test_kl_estimators_hand_computed() -> None:
    logp, ref = t(-1.0, -2.0, -0.5), t(-1.5, -1.0, -0.5)
    # log-ratio logp - ref = (0.5, -1, 0); r = ref - logp = (-0.5, 1, 0)
    torch.testing.assert_close(kl_penalty(logp, ref), t(0.5, -1.0, 0.0))  # k1 can be negative
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t(0.125, 0.5, 0.0))
    k3 = kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(k3, t(math.exp(-0.5) - 1 + 0.5, math.e - 2.0, 0.0))  # 0.1065307, 0.7182818, 0
    assert (k3 >= 0).all() and (kl_penalty(logp, ref, "k2") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_clamp_bounds_the_estimate_not_the_log_ratio() -> None:
    logp, ref = t(-1.0, -2.0, -0.5), t(-1.5, -1.0, -0.5)
    torch.testing.assert_close(kl_penalty(logp, ref, clamp=0.6), t(0.5, -0.6, 0.0))
    # k2 = (0.125, 0.5, 0): the estimate 0.5 is clamped to 0.4 (clamping the log-ratio would give 0.18)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2", clamp=0.4), t(0.125, 0.4, 0.0))
    # huge ratio: r = 200 overflows exp in float32 without a clamp
    logp, ref = t(-200.0), t(0.0)
    assert torch.isinf(kl_penalty(logp, ref, "k3")).all()
    # kl_penalty(-10, 0, "k3", clamp=10) was e^10 - 11 = 22015 per token with the log-ratio clamped
    assert kl_penalty(t(-10.0), t(0.0), "k3", clamp=10.0).item() == pytest.approx(10.0)
    assert kl_penalty(logp, ref, "k3", clamp=10.0).item() == pytest.approx(10.0)
    assert kl_penalty(t(-1.0), t(0.0), "k3", clamp=10.0).item() == pytest.approx(math.e - 2.0)  # below the bound


def _kl_loss_gradient(estimator: str) -> torch.Tensor:
    """Exact expected gradient (w.r.t. the policy's logits) of E_{x~pi}[k(x)] used as a loss on samples
    from pi, the way a KL-in-loss term is differentiated: sum_x pi(x) * d k(x) / d logits, with pi(x)
    itself treated as the sampling distribution (no gradient through the sampling)."""
    logits = torch.tensor([0.3, -1.2, 0.8, 0.1, -0.4, 1.5], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 1.0, 0.2, -1.0], dtype=torch.float64), -1)
    logp = torch.log_softmax(logits, -1)
    weights = logp.exp().detach()
    loss = (weights * kl_penalty(logp, ref_logp, estimator)).sum()  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_kl_estimators_as_losses_have_the_documented_gradients() -> None:
    # k1 as a loss: E_pi[d log pi] = 0, so no regularization at all (why kl_in=loss refuses it)
    torch.testing.assert_close(_kl_loss_gradient("k1"), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    logits = torch.tensor([0.3, -1.2, 0.8, 0.1, -0.4, 1.5], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 1.0, 0.2, -1.0], dtype=torch.float64), -1)
    logp = torch.log_softmax(logits, -1)
    forward_kl = (logp.exp() * (logp - ref_logp)).sum()  # KL(pi || ref)
    reverse_kl = (ref_logp.exp() * (ref_logp - logp)).sum()  # KL(ref || pi)
    (g_forward,) = torch.autograd.grad(forward_kl, logits, retain_graph=True)
    (g_reverse,) = torch.autograd.grad(reverse_kl, logits)
    torch.testing.assert_close(_kl_loss_gradient("k2"), g_forward)
    torch.testing.assert_close(_kl_loss_gradient("k3"), g_reverse)


def test_fixed_kl_controller() -> None:
    ctl = FixedKLController(0.05)
    for kl in (0.0, 100.0, -3.0):
        ctl.update(kl, 64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.value == 0.05


def test_adaptive_kl_controller_hand_computed() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # 9/6 - 1 = 0.5 -> clipped to 0.2: x (1 + 0.2*256/10000) = x 1.00512
    assert ctl.value == pytest.approx(0.201024)
    ctl.update(3.0, 512)  # 3/6 - 1 = -0.5 -> clipped to -0.2: x (1 - 0.2*512/10000) = x 0.98976
    assert ctl.value == pytest.approx(0.201024 * 0.98976)  # 0.19896551
    ctl.update(6.6, 1000)  # 6.6/6 - 1 = 0.1, inside the clip: x (1 + 0.1*1000/10000) = x 1.01
    assert ctl.value == pytest.approx(0.201024 * 0.98976 * 1.01)  # 0.20095517
    state = json.loads(json.dumps(ctl.state_dict()))
    restored = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, target=0.0, horizon=10)


# ---------------------------------------------------------------- PPO policy loss

# Five elements, clip_range 0.2:
#   ratio 1.5, A=+1: -1.5 vs clipped -1.2 -> -1.2 (clipped)
#   ratio 0.5, A=+1: -0.5 vs clipped -0.8 -> -0.5
#   ratio 0.5, A=-2:  1.0 vs clipped  1.6 ->  1.6 (clipped)
#   ratio 1.5, A=-2:  3.0 vs clipped  2.4 ->  3.0
#   ratio 1.1, A=+1: -1.1 vs clipped -1.1 -> -1.1 (tie: not counted as clipped)
RATIOS = [1.5, 0.5, 0.5, 1.5, 1.1]
ADVS = [1.0, 1.0, -2.0, -2.0, 1.0]


def _policy_inputs():
    old = t(-1.0, -2.0, -0.7, -3.0, -1.5)
    logp = (old + torch.log(t(*RATIOS))).requires_grad_(True)
    return logp, old, t(*ADVS)


def test_clipped_policy_loss_hand_computed() -> None:
    logp, old, adv = _policy_inputs()
    loss, stats = clipped_policy_loss(logp, old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.6 + 3.0 - 1.1) / 5, abs=1e-6)  # 0.36
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    kl = sum((r - 1) - math.log(r) for r in RATIOS) / 5  # 0.1160108
    assert stats["approx_kl"].item() == pytest.approx(kl, abs=1e-6)
    assert stats["ratio"].item() == pytest.approx(1.02, abs=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    # d loss / d logp_i = -A_i * ratio_i / 5 where unclipped, exactly 0 where clipped
    loss.backward()
    torch.testing.assert_close(logp.grad, t(0.0, -0.1, 0.0, 0.6, -0.22))
    assert logp.grad[0].item() == 0.0 and logp.grad[2].item() == 0.0


def test_clipped_policy_loss_asymmetric_clip() -> None:
    logp, old, adv = _policy_inputs()
    # clip_range_high 0.28: element 0 clips at -1.28 instead of -1.2; element 3 still unclipped (2.56 < 3)
    loss, stats = clipped_policy_loss(logp, old, adv, clip_range=0.2, clip_range_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.6 + 3.0 - 1.1) / 5, abs=1e-6)  # 0.344
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    # ratio 1.25 with A=+1: clipped at 1.2 by the symmetric range, free under clip-higher 0.28
    one = torch.log(t(1.25))
    sym, s1 = clipped_policy_loss(one, t(0.0), t(1.0), clip_range=0.2)
    high, s2 = clipped_policy_loss(one, t(0.0), t(1.0), clip_range=0.2, clip_range_high=0.28)
    assert sym.item() == pytest.approx(-1.2) and s1["clipfrac"].item() == 1.0
    assert high.item() == pytest.approx(-1.25) and s2["clipfrac"].item() == 0.0
    # the low side still uses clip_range: ratio 0.5 with A=-2 clips at 0.8 -> 1.6
    low, _ = clipped_policy_loss(torch.log(t(0.5)), t(0.0), t(-2.0), clip_range=0.2, clip_range_high=0.28)
    assert low.item() == pytest.approx(1.6)


def test_clipped_policy_loss_mask_ignores_padding() -> None:
    logp, old, adv = _policy_inputs()
    # (2, 4) layout: row 0 holds elements 0..2, row 1 holds 3..4; padding holds wild values
    pad_logp = torch.tensor([[0, 0, 0, 60.0], [0, 0, 40.0, 0]])
    full_old = torch.tensor([[0, 0, 0, -80.0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    idx = mask.bool()
    leaf = logp.detach().clone().requires_grad_(True)
    tok_logp = pad_logp.masked_scatter(idx, leaf)
    tok_old = full_old.masked_scatter(idx, old)
    tok_adv = torch.full((2, 4), 1e6).masked_scatter(idx, adv)
    loss, stats = clipped_policy_loss(tok_logp, tok_old, tok_adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.36, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    assert stats["ratio"].item() == pytest.approx(1.02, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(leaf.grad, t(0.0, -0.1, 0.0, 0.6, -0.22))
    # gradient to the padding itself is zero and finite
    pad_leaf = pad_logp.clone().requires_grad_(True)
    loss2, _ = clipped_policy_loss(pad_leaf, tok_old, tok_adv, mask, clip_range=0.2)
    loss2.backward()
    assert torch.isfinite(pad_leaf.grad).all() and (pad_leaf.grad[~idx] == 0).all()


# ---------------------------------------------------------------- PPO value loss


def test_clipped_value_loss_hand_computed() -> None:
    values = t(1.0, 2.0, 0.0, 1.0).requires_grad_(True)
    old, returns = t(0.5, 2.5, 0.0, 0.0), t(2.0, 1.0, 1.0, 0.5)
    # unclipped squared errors: 1, 1, 1, 0.25
    loss, clipfrac = clipped_value_loss(values, old, returns, clip_range=None)
    assert loss.item() == pytest.approx(0.5 * 3.25 / 4)  # 0.40625
    assert clipfrac.item() == 0.0
    # clip 0.2: V_clip = 0.7, 2.3, 0.0, 0.2 -> squared errors 1.69, 1.69, 1, 0.09
    # max: 1.69, 1.69, 1 (tie), 0.25 -> 0.5 * 4.63 / 4 = 0.57875; clipped term larger in 2 of 4
    loss, clipfrac = clipped_value_loss(values, old, returns, clip_range=0.2)
    assert loss.item() == pytest.approx(0.57875, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()  # the clipped elements get no gradient; d/dV = (V - R) / 4 elsewhere
    torch.testing.assert_close(values.grad, t(0.0, 0.0, -0.25, 0.125))
    # mask: only elements 0 and 3 -> 0.5 * (1.69 + 0.25) / 2 = 0.485
    mask = t(1, 0, 0, 1)
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.485, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- entropy, explained variance


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_from_logits_matches_categorical(temperature: float) -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 7, 11, generator=g) * 3
    ent = entropy_from_logits(logits, temperature=temperature, chunk_size=3)
    expected = torch.distributions.Categorical(logits=logits / temperature).entropy()
    assert ent.shape == (2, 7) and ent.dtype == torch.float32
    torch.testing.assert_close(ent, expected, atol=1e-5, rtol=1e-5)
    half = logits.bfloat16()
    expected_half = torch.distributions.Categorical(logits=half.float() / temperature).entropy()
    ent_half = entropy_from_logits(half, temperature=temperature, chunk_size=4)
    torch.testing.assert_close(ent_half, expected_half, atol=1e-4, rtol=1e-4)


def test_entropy_handles_masked_vocabulary() -> None:
    logits = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]])
    assert entropy_from_logits(logits).item() == pytest.approx(math.log(2))


def test_explained_variance() -> None:
    target = t(1.0, 2.0, 4.0, 7.0)
    assert explained_variance(target.clone(), target) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(target, target.mean().item()), target) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(torch.zeros(4), target) == pytest.approx(0.0, abs=1e-12)  # offsets do not count
    assert explained_variance(target.flip(0), target) < 0  # worse than predicting the mean
    assert math.isnan(explained_variance(t(1, 2, 3), t(5, 5, 5)))
    # masked: only the first two elements count (target 1, 2; prediction 1, 2 -> perfect)
    assert explained_variance(t(1, 2, 99, -99), target, t(1, 1, 0, 0)) == pytest.approx(1.0)


def test_bootstrap_next_values_uses_the_final_observation_only_where_an_episode_was_truncated():
    from rlhfkit.rl.advantages import bootstrap_next_values

    # 3 steps x 2 envs. Env 0: truncated at t=1 (ended, not terminated): V(final obs) = 9 replaces
    # values[2] = 3, the value of the next episode's first observation. Env 1: terminated at t=0: keeps
    # values[1] = 20 (gae does not bootstrap a terminal step). After the last step: last_value.
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    last_value = torch.tensor([4.0, 40.0])
    finals = torch.full((3, 2), 9.0)
    terminated = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    ends = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    out = bootstrap_next_values(values, last_value, finals, terminated, ends)
    assert out.tolist() == [[2.0, 20.0], [9.0, 30.0], [4.0, 40.0]]
    # the same through gae, by hand for env 0 with gamma 1, lam 1, rewards 0: A_2 = 4 - 3 = 1;
    # A_1 = 9 - 2 = 7 (the episode ends at t=1: no recursion past it); A_0 = (2 - 1) + A_1 = 8
    adv, _ = gae(torch.zeros(3, 2), values, out, terminated, ends, gamma=1.0, lam=1.0)
    assert adv[:, 0].tolist() == [8.0, 7.0, 1.0]
    with pytest.raises(ValueError, match="last_value has shape"):
        bootstrap_next_values(values, torch.zeros(3), finals, terminated, ends)
    with pytest.raises(ValueError, match="final_values has shape"):
        bootstrap_next_values(values, last_value, torch.zeros(2, 2), terminated, ends)
