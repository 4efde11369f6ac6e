"""The code that wires the pure maths into the recipes, pinned where a mutation of it once passed the
whole suite: sampling temperature in the PPO forward, the sign of the KL in rewards and losses, the
response mask in whitening, IPO's lengths in the DPO recipe, the reward-model centering term, critic
warm-up, RNG restore on resume, and the SFT loss itself."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError
from rlhfkit.losses.dpo import dpo_loss
from rlhfkit.losses.reward import bradley_terry_loss
from rlhfkit.losses.sft import sft_loss
from rlhfkit.rl.advantages import rloo_advantages
from rlhfkit.rl.shaping import sequence_rewards, shape_rewards
from tests.test_ppo import make_prompts, tiny_args


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# losses/sft.py by hand


def test_sft_loss_hand_computed() -> None:
    # vocabulary of 3; logits at positions 0..2 of one row; labels aligned with the inputs
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[-100, 0, -100, 2]])  # position 0 predicts label 0; position 2 predicts label 2
    loss, m = sft_loss(logits, labels)
    # -(log 0.5 + log 0.6) / 2 = (0.693147 + 0.510826) / 2 = 0.601986
    assert loss.item() == pytest.approx((-math.log(0.5) - math.log(0.6)) / 2, abs=1e-6)
    assert m["num_tokens"].item() == 2 and m["num_correct"].item() == 2  # argmax is right at both
    assert m["nll_sum"].item() == pytest.approx(-math.log(0.5) - math.log(0.6), abs=1e-6)
    # a fixed normaliser (tokens of the whole step) replaces the local count
    loss10, _ = sft_loss(logits, labels, num_tokens=10.0)
    assert loss10.item() == pytest.approx((-math.log(0.5) - math.log(0.6)) / 10, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Reward model: the centering term is mean(s^2), not mean(s)^2


def test_bradley_terry_centering_uses_the_mean_of_squares() -> None:
    r_c, r_r = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.5])  # sums s = 3 and -1
    loss, _ = bradley_terry_loss(r_c, r_r, center_coef=0.1)
    bt = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2  # diffs 1 and 2
    # mean(s^2) = (9 + 1) / 2 = 5; mean(s)^2 would be 1
    assert loss.item() == pytest.approx(bt + 0.1 * 5.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# RLOO/GRPO shaped reward and whitening


def test_sequence_reward_subtracts_the_summed_kl_when_the_kl_is_in_the_reward() -> None:
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.5, 0.25, 9.0], [0.1, 0.1, 0.1]])  # 9.0 sits on padding in row 0
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: 1 - 0.2 * 0.75 = 0.85; row 1: 2 - 0.2 * 0.3 = 1.94
    torch.testing.assert_close(sequence_rewards(scores, kl, mask, 0.2, "reward"), torch.tensor([0.85, 1.94]))
    torch.testing.assert_close(sequence_rewards(scores, kl, mask, 0.2, "loss"), scores)
    # through shape_rewards: k1 with logp - ref = the kl above on real tokens
    old = torch.tensor([[0.5, 0.25, 0.0], [0.1, 0.1, 0.1]])
    shaped = shape_rewards(scores, old, torch.zeros(2, 3), None, mask, kl_coef=0.2, advantage="rloo",
                           samples_per_prompt=2)
    torch.testing.assert_close(shaped.rlhf_reward, torch.tensor([0.85, 1.94]))
    # rloo with k = 2: A = R_i - R_other = (-1.09, 1.09), not whitened by default, zero on padding
    torch.testing.assert_close(shaped.advantages, torch.tensor([[-1.09, -1.09, 0.0], [1.09, 1.09, 1.09]]))


def test_rloo_default_keeps_each_completions_sign() -> None:
    # Two prompts; whitening over tokens subtracts a token-weighted mean: prompt 1's winner is long
    # (8 tokens of +1) and its loser short (1 token of -1), so the mean is 7/11 and prompt 2's winner
    # (+0.1, 1 token) would turn negative.
    scores = torch.tensor([1.0, 0.0, 0.2, 0.1])
    one = [1.0, 0, 0, 0, 0, 0, 0, 0]
    mask = torch.tensor([[1.0] * 8, one, one, one])
    zeros = torch.zeros(4, 8)
    shaped = shape_rewards(scores, zeros, zeros, None, mask, kl_coef=0.0, advantage="rloo", samples_per_prompt=2)
    expected = rloo_advantages(scores, 2)  # (1, -1, 0.1, -0.1)
    torch.testing.assert_close(shaped.advantages[:, 0], expected)
    whitened = shape_rewards(scores, zeros, zeros, None, mask, kl_coef=0.0, advantage="rloo", samples_per_prompt=2,
                             whiten_advantages=True)
    assert whitened.advantages[2, 0] < 0 < expected[2], "the case whitening gets wrong"


def test_gae_advantages_are_whitened_over_real_tokens_only() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([3.0, -1.0])
    values = torch.tensor([[0.5, 0.1, -0.3, 0.2, 0.0], [1.0, -2.0, 7.0, 7.0, 7.0]])  # junk on padding
    zeros = torch.zeros(2, 5)
    shaped = shape_rewards(scores, zeros, zeros, values, mask, kl_coef=0.1, advantage="gae")
    real = shaped.advantages[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var().item() == pytest.approx(1.0, abs=1e-5)  # unbiased, over the 7 real tokens
    assert (shaped.advantages[~mask.bool()] == 0).all()


# --------------------------------------------------------------------------------------------------
# DPO recipe: IPO gets each side's own length


def test_dpo_recipe_loss_passes_chosen_and_rejected_lengths_in_order() -> None:
    from rlhfkit.recipes.dpo import DPOConfig, _loss

    cfg = load_config(DPOConfig, None, ["data.train=x.jsonl", "dpo.loss_type=ipo", "dpo.beta=0.5"])
    logps = torch.tensor([-10.0, -20.0, -12.0, -18.0])  # chosen (2), then rejected (2)
    counts = torch.tensor([4.0, 10.0, 2.0, 5.0])
    ref_c, ref_r = torch.tensor([-12.0, -21.0]), torch.tensor([-11.0, -17.0])  # ratios (2, 1) and (-1, -1)
    got, _, _ = _loss(cfg, logps, counts, ref_c, ref_r)
    want, _, _ = dpo_loss(logps[:2], logps[2:], ref_c, ref_r, beta=0.5, loss_type="ipo",
                          chosen_lengths=counts[:2], rejected_lengths=counts[2:])
    torch.testing.assert_close(got, want)
    swapped, _, _ = dpo_loss(logps[:2], logps[2:], ref_c, ref_r, beta=0.5, loss_type="ipo",
                             chosen_lengths=counts[2:], rejected_lengths=counts[:2])
    assert not torch.allclose(got, swapped)


def test_dpo_recipe_length_alpha_and_sft_weight_hand_computed() -> None:
    from rlhfkit.recipes.dpo import DPOConfig, _loss

    cfg = load_config(DPOConfig, None, ["data.train=x.jsonl", "dpo.beta=0.1", "dpo.length_alpha=0.01",
                                        "dpo.sft_weight=0.5"])
    logps = torch.tensor([-10.0, -12.0])  # chosen, rejected
    counts = torch.tensor([30.0, 10.0])
    got, rc, rr = _loss(cfg, logps, counts, torch.tensor([-11.0]), torch.tensor([-11.0]))
    # -log sigma(0.1 * 2 + 0.01 * 20) + 0.5 * 10 / 30
    assert got.item() == pytest.approx(math.log1p(math.exp(-0.4)) + 0.5 * 10 / 30, abs=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.1, -0.1))
    with pytest.raises(ConfigError, match="length_alpha"):
        load_config(DPOConfig, None, ["data.train=x.jsonl", "dpo.loss_type=ipo", "dpo.length_alpha=0.01"])


# --------------------------------------------------------------------------------------------------
# PPO recipe glue


def test_ppo_at_another_temperature_starts_with_ratio_one(tmp_path: Path) -> None:
    from rlhfkit.recipes.ppo import PPOConfig, train

    data = make_prompts(tmp_path / "p.jsonl")
    # rloo in fp32 keeps the sampler's log-probs (taken at temperature 0.7): the training forward must
    # divide by the same temperature, or the first ratio is not 1
    args = tiny_args(data, tmp_path / "r", "ppo.advantage=rloo", "rollout.samples_per_prompt=2", "ppo.epochs=1",
                     "ppo.mini_batch_size=16", "rollout.temperature=0.7", "train.max_steps=1",
                     "data.eval_fraction=0")
    train(load_config(PPOConfig, None, args))
    (row,) = [r for r in _rows(tmp_path / "r") if "policy/ratio" in r]
    assert row["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert row["policy/approx_kl"] == pytest.approx(0.0, abs=1e-6)


def test_kl_in_loss_raises_the_loss_with_the_kl() -> None:
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
    from rlhfkit.recipes.ppo import Batch, PolicyAndValue, PPOConfig, minibatch_loss, score_rollout
    from rlhfkit.rollout.engine import sample

    cfg = load_config(PPOConfig, None, ["data.train=x.jsonl", "ppo.advantage=grpo", "rollout.samples_per_prompt=2",
                                        "ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.kl_clamp=0",
                                        "ppo.mini_batch_size=2", "train.batch_size=1"])
    tok = load_tokenizer("tiny:llama")
    policy = load_causal_lm(ModelConfig(name="tiny:llama", device="cpu"), torch.device("cpu"), tok)
    model = PolicyAndValue(policy)
    torch.manual_seed(0)
    r = sample(policy, [[1, 2, 3], [1, 2, 3]], pad_id=tok.pad_token_id, eos_ids=[-1], max_new_tokens=5)
    old, _, _ = score_rollout(cfg, model, policy, r, None)
    mask = r.response_mask.float()
    idx = torch.arange(2)
    losses = []
    for shift in (0.0, 0.5, 1.0):  # the reference moves away from the policy: KL(ref || pi) grows
        b = Batch(r, old, old - shift * mask, None, torch.zeros_like(old), None, mask)
        loss, stats = minibatch_loss(cfg, model, b, idx, critic_only=False, kl_coef=0.3, amp=None)
        losses.append(loss.item())
        # zero advantages: the policy term is 0 and the loss is kl_coef * k3, with log pi - log ref = shift
        # on every token: k3 = e^-shift - 1 + shift (0, 0.1065, 0.3679)
        assert stats["policy/kl_loss"] == pytest.approx(math.expm1(-shift) + shift, abs=1e-4)
        assert loss.item() == pytest.approx(0.3 * (math.expm1(-shift) + shift), abs=1e-4)
    assert losses[0] < losses[1] < losses[2]


def test_kl_in_loss_refuses_k1() -> None:
    from rlhfkit.errors import ConfigError
    from rlhfkit.recipes.ppo import PPOConfig

    with pytest.raises(ConfigError, match="k1 used as a loss has zero expected gradient"):
        load_config(PPOConfig, None, ["data.train=x.jsonl", "ppo.advantage=grpo", "rollout.samples_per_prompt=2",
                                      "ppo.kl_in=loss"])


def test_critic_warm_up_leaves_the_policy_and_its_optimizer_state_alone(tmp_path: Path) -> None:
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
    from rlhfkit.recipes.ppo import PPOConfig, train

    data = make_prompts(tmp_path / "p.jsonl")
    out = train(load_config(PPOConfig, None, tiny_args(data, tmp_path / "r", "value.warmup_steps=2", "train.max_steps=2",
                                                         "train.weight_decay=0.1", "data.eval_fraction=0")))
    start = load_causal_lm(ModelConfig(name="tiny:llama", device="cpu"), torch.device("cpu"), load_tokenizer("tiny:llama"))
    trained = load_file(str(out / "model.safetensors"))
    for name, param in start.state_dict().items():
        if name in trained:
            torch.testing.assert_close(trained[name], param, rtol=0, atol=0, msg=f"{name} moved during warm-up")
    ckpt = next((tmp_path / "r" / "checkpoints").glob("step-*"))
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    head = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]
    n_params = sum(len(g["params"]) for g in head)
    assert len(state) == 1 < n_params, "only the value head has Adam state after warm-up"


def test_recompute_old_logprobs_for_weights_that_are_not_fp32() -> None:
    from rlhfkit.recipes.ppo import PolicyAndValue, PPOConfig, _recompute_old_logprobs

    cfg = load_config(PPOConfig, None, ["data.train=x.jsonl", "ppo.advantage=rloo", "rollout.samples_per_prompt=2"])
    linear = torch.nn.Linear(2, 2)
    assert not _recompute_old_logprobs(cfg, PolicyAndValue(linear), None)
    assert _recompute_old_logprobs(cfg, PolicyAndValue(linear.to(torch.bfloat16)), None)
    assert _recompute_old_logprobs(cfg, PolicyAndValue(torch.nn.Linear(2, 2)), torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# RNG: every stream restored on resume


def test_restore_training_state_puts_back_python_numpy_and_torch_streams(tmp_path: Path) -> None:
    from rlhfkit.runtime.checkpoint import restore_training_state, save_training_state
    from rlhfkit.runtime.distributed import DistInfo
    from rlhfkit.runtime.optim import TrainConfig, build_optimizer, build_scheduler

    class Net(torch.nn.Linear):
        def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
            Path(path).mkdir(parents=True)
            save_file(self.state_dict(), str(Path(path) / "model.safetensors"))

    model = Net(2, 1)
    optimizer = build_optimizer(model, TrainConfig())
    scheduler = build_scheduler(optimizer, TrainConfig(), 10)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_training_state(tmp_path, 5, model=model, optimizer=optimizer, scheduler=scheduler, state={}, keep=0,
                               info=DistInfo())
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler, info=DistInfo())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


# --------------------------------------------------------------------------------------------------
# PPO loss normalization across ranks


def _ppo_fixture():  # noqa: ANN202
    """A tiny policy, 4 completions of 6 tokens (rows 2-3 cut to 1 real token) and fixed advantages."""
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
    from rlhfkit.recipes.ppo import Batch, PolicyAndValue, PPOConfig
    from rlhfkit.rollout.engine import sample

    tok = load_tokenizer("tiny:llama")
    policy = load_causal_lm(ModelConfig(name="tiny:llama", device="cpu"), torch.device("cpu"), tok)
    torch.manual_seed(0)
    r = sample(policy, [[1, 2, 3]] * 4, pad_id=tok.pad_token_id, eos_ids=[-1], max_new_tokens=6)
    r.response_mask[2:, 1:] = 0  # rank 1 will hold 2 tokens, rank 0 twelve
    mask = r.response_mask.float()
    adv = torch.tensor([[0.5], [-1.0], [2.0], [1.5]]) * mask
    cfg = load_config(PPOConfig, None, ["data.train=x.jsonl", "ppo.advantage=rloo", "rollout.samples_per_prompt=2",
                                        "ppo.epochs=1", "ppo.mini_batch_size=2", "train.batch_size=1"])
    model = PolicyAndValue(policy)
    return cfg, model, Batch(r, r.logprobs.float() * mask, r.logprobs.float() * mask, None, adv, None, mask)


class _Capture:
    """What ppo_update needs of a Session, recording the gradient of each update instead of stepping."""

    def __init__(self, ddp: torch.nn.Module, info: object) -> None:
        self.ddp, self.info, self.amp, self.grads = ddp, info, None, []

    def no_sync(self, last: bool):  # noqa: ANN201
        import contextlib

        return self.ddp.no_sync() if getattr(self.info, "enabled", False) and not last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self, model: torch.nn.Module, step: int, losses: dict) -> float:
        self.grads.append(torch.cat([p.grad.flatten() for p in model.policy.parameters()]).clone())
        model.zero_grad(set_to_none=True)
        return 0.0


def _rank_grads(rank: int) -> torch.Tensor:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rlhfkit.recipes.ppo import Batch, ppo_update
    from rlhfkit.runtime.distributed import DistInfo

    cfg, model, b = _ppo_fixture()
    rows = torch.arange(2 * rank, 2 * rank + 2)
    mine = Batch(b.rollout.select(rows), b.old_logps[rows], b.ref_logps[rows], None, b.advantages[rows], None,
                 b.mask[rows])
    run = _Capture(DDP(model), DistInfo(rank, 2, rank))
    ppo_update(cfg, run, model, mine, 1, critic_only=False, kl_coef=0.0)  # type: ignore[arg-type]
    return run.grads[0]


def _rank_main(rank: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    # The DDP wrapper lives only inside _rank_grads: a DDP reducer still alive when the group is
    # destroyed tears down its process group at exit, and that hung about one run in six.
    grads = _rank_grads(rank)
    if rank == 0:
        torch.save(grads, f"{folder}/grad.pt")
    dist.barrier()
    dist.destroy_process_group()


def _spawn_ranks(fn: Callable[..., None], args: tuple, nprocs: int, deadline_s: float = 240.0) -> None:
    """torch.multiprocessing.spawn with a deadline: ranks still running after it are killed and the
    test fails, so a stuck collective cannot stall the suite."""
    ctx = torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=1.0):
        if time.monotonic() - start > deadline_s:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"{nprocs} spawned ranks still running after {deadline_s:.0f} s")


def test_ppo_loss_weighs_every_token_equally_across_ranks(tmp_path: Path) -> None:
    from rlhfkit.recipes.ppo import ppo_update
    from rlhfkit.runtime.distributed import DistInfo

    cfg, model, b = _ppo_fixture()
    # one process, the 4 completions as one minibatch: the token mean over all 14 real tokens
    cfg.ppo.mini_batch_size = 4
    run = _Capture(model, DistInfo())
    ppo_update(cfg, run, model, b, 1, critic_only=False, kl_coef=0.0)  # type: ignore[arg-type]
    (single,) = run.grads
    # two processes with 2 completions each (12 and 2 tokens): the averaged gradient must be the same
    _spawn_ranks(_rank_main, (str(tmp_path),), nprocs=2)
    both = torch.load(tmp_path / "grad.pt")
    torch.testing.assert_close(both, single, rtol=1e-4, atol=1e-7)
