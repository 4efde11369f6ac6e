"""PPO / RLOO / GRPO on tiny models: rewards land where they should, learning, resume, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.recipes.ppo import PPOConfig, train
from rlhfkit.rl.advantages import token_gae
from rlhfkit.rl.rewards import build_reward_sources, parse_source, score_all
from rlhfkit.rl.shaping import penalize_unfinished, token_rewards
from tests.conftest import write_jsonl
from tests.test_sft import _cli, _losses

ROOT = Path(__file__).resolve().parents[1]


def make_prompts(path: Path, n: int = 24) -> Path:
    things = "cafe park movie phone hotel book shoe bus".split()
    return write_jsonl(path, [{"prompt": f"Describe the {things[i % len(things)]} number {i}."} for i in range(n)])


@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny:llama with its (tied) embeddings scaled up: a fresh tiny model is almost uniform over 49k
    tokens with logits too small to ever become peaked in a few dozen steps; scaled, it behaves like a
    trained LM (context-dependent, peaked) while staying 3M parameters. Same token directions, so
    tests.ppo_rewards:aligned_tokens still starts near 0.5."""
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.tiny import build_tiny

    tok = load_tokenizer("tiny:llama")
    model = build_tiny("llama", tok)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
    folder = tmp_path_factory.mktemp("sharp") / "tiny-sharp"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def tiny_args(data: Path, out: Path, *extra: str, model: str = "tiny:llama") -> list[str]:
    return [f"model.name={model}", "model.device=cpu", f"data.train={data}", "data.eval_fraction=0.25",
            "reward.sources=tests.ppo_rewards:aligned_tokens", "rollout.max_new_tokens=8", "train.batch_size=8",
            "ppo.mini_batch_size=4", "train.lr=3e-3", "progress=false", "tensorboard=false", "sample_every=0",
            f"output_dir={out}", *extra]


# --------------------------------------------------------------------------------------------------
# Rewards and their placement


def test_score_lands_on_the_last_real_token_never_on_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    kl = torch.full((4, 5), 0.5)
    rewards = token_rewards(torch.tensor([2.0, 3.0, 4.0, 5.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.05, 1.95, 0, 0], [-0.05, -0.05, -0.05, -0.05, 2.95],
                             [3.95, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    torch.testing.assert_close(rewards, expected)
    # gamma = lambda = 1 and zero values: each token's advantage is the reward-to-go of its row.
    adv, _ = token_gae(rewards, torch.zeros(4, 5), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[0], torch.tensor([1.85, 1.90, 1.95, 0, 0]))
    torch.testing.assert_close(adv[3], torch.zeros(5))


def test_score_position_does_not_depend_on_prompt_padding(tokenizer) -> None:  # noqa: ANN001
    """The same completion scored after a short (left-padded) and a long prompt: same per-token rewards."""
    from rlhfkit.models.tiny import build_tiny
    from rlhfkit.rollout.engine import sample

    torch.manual_seed(0)
    model = build_tiny("llama", tokenizer)
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12]]
    r = sample(model, prompts, pad_id=tokenizer.pad_token_id, eos_ids=list(range(0, 49152, 3)), max_new_tokens=6,
               temperature=1.0)
    mask = r.response_mask.float()
    rewards = token_rewards(torch.tensor([1.0, 1.0]), torch.zeros_like(mask), mask, kl_coef=0.0)
    for row in range(2):
        n = int(mask[row].sum())
        assert rewards[row, n - 1] == 1.0 and rewards[row].sum() == 1.0
        assert r.response_mask[row, :n].all() and not r.response_mask[row, n:].any()


def test_missing_eos_penalty() -> None:
    out = penalize_unfinished(torch.tensor([1.0, 1.0, -0.5]), torch.tensor([True, False, False]), 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, -2.5]))
    torch.testing.assert_close(penalize_unfinished(torch.tensor([1.0]), torch.tensor([False]), 0.0), torch.tensor([1.0]))


def test_reward_sources_weighted_sum_and_errors() -> None:
    assert parse_source("0.5*sentiment", "k") == (0.5, "sentiment")
    assert parse_source("-1e-2 * length", "k") == (-0.01, "length")
    assert parse_source("tests.ppo_rewards:text_length", "k") == (1.0, "tests.ppo_rewards:text_length")
    sources = build_reward_sources(["sentiment", "0.1*tests.ppo_rewards:text_length", "-1*length"],
                                   device=torch.device("cpu"))
    total, parts = score_all(sources, ["p", "p"], ["I love it, wonderful!", "bad awful day"])
    from rlhfkit.feedback.annotators import sentiment_score

    s = [sentiment_score("p", "I love it, wonderful!"), sentiment_score("p", "bad awful day")]
    torch.testing.assert_close(total, torch.tensor([s[0] + 2.1 + 4, s[1] + 1.3 + 3]))
    assert set(parts) == {"score/sentiment", "score/text_length", "score/length"}

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].*neither"):
        build_reward_sources(["sentimnet"], device=cpu)
    with pytest.raises(ConfigError, match="no attribute"):
        build_reward_sources(["tests.ppo_rewards:missing"], device=cpu)
    with pytest.raises(ConfigError, match="not importable"):
        build_reward_sources(["no_such_module_xyz:f"], device=cpu)
    with pytest.raises(ConfigError, match="at least one"):
        build_reward_sources([], device=cpu)
    for name, message in [("wrong_count", "returned 1 scores for 2"), ("not_a_number", "list of numbers"),
                          ("nan_score", "non-finite"), ("explodes", "scorer crashed")]:
        src = build_reward_sources([f"tests.ppo_rewards:{name}"], device=cpu)
        with pytest.raises(RlhfkitError, match=message):
            score_all(src, ["a", "b"], ["x", "y"])


def test_reward_model_source_uses_its_own_tokenizer(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    """A reward-model folder scores decoded text exactly as heads.score_texts does (with its stats)."""
    from rlhfkit.models.heads import build_reward_model, load_reward_model, score_texts
    from rlhfkit.models.load import ModelConfig

    rm = build_reward_model(ModelConfig(name="tiny:qwen2"), tokenizer, seed=3)
    rm.config.rlhfkit_reward_mean, rm.config.rlhfkit_reward_std = 0.25, 2.0
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "rm")
    src = build_reward_sources([f"2*{tmp_path / 'rm'}"], device=torch.device("cpu"))
    prompts, texts = ["Review a cafe.", "Review a park."], ["Lovely place.", "Too noisy, sadly."]
    total, parts = score_all(src, prompts, texts)
    model, tok = load_reward_model(str(tmp_path / "rm"), "cpu")
    expected = torch.tensor(score_texts(model, tok, prompts, texts, normalize=True))
    torch.testing.assert_close(total, 2 * expected)
    assert list(parts) == ["score/rm"]


def test_reward_model_inputs_over_max_length_keep_their_end(tmp_path: Path, tokenizer, capsys) -> None:  # noqa: ANN001
    """reward.truncation=left: a too-long input is scored on its last max_length tokens (warned once);
    reward.truncation=error stops with the item and the setting."""
    from rlhfkit.errors import DataError
    from rlhfkit.models.heads import build_reward_model, encode_response, load_reward_model, score_ids
    from rlhfkit.models.load import ModelConfig

    rm = build_reward_model(ModelConfig(name="tiny:llama"), tokenizer, seed=4)
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts, texts = ["Review a cafe. " * 20, "Hi."], ["Lovely place, great coffee.", "Fine."]
    model, tok = load_reward_model(str(tmp_path / "rm"), "cpu")
    full = [encode_response(tok, p, t, max_length=10_000) for p, t in zip(prompts, texts)]
    limit = len(full[1]) + 3
    assert len(full[0]) > limit  # the first input overflows, the second fits
    src = build_reward_sources([str(tmp_path / "rm")], device=torch.device("cpu"), max_length=limit)
    total, _ = score_all(src, prompts, texts)
    expected = score_ids(model, [full[0][-limit:], full[1]], tok.pad_token_id, 8)
    torch.testing.assert_close(total, torch.tensor(expected))
    score_all(src, prompts, texts)
    assert capsys.readouterr().err.count("1 of 2 inputs were longer than reward.max_length") == 1
    strict = build_reward_sources([str(tmp_path / "rm")], device=torch.device("cpu"), max_length=limit,
                                  truncation="error")
    with pytest.raises(DataError, match=f"item 0: .*longer than max_length.*> {limit} tokens"):
        score_all(strict, prompts, texts)


# --------------------------------------------------------------------------------------------------
# End to end


def _metric(run: Path, key: str) -> dict[int, float]:
    return _losses(run, key)


def test_ppo_learns_a_programmatic_reward(tmp_path: Path, sharp_tiny: Path) -> None:
    data = make_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "run"
    train(load_config(PPOConfig, None, tiny_args(data, out, "train.max_steps=30", "ppo.kl_coef=0.01", "train.lr=2e-3",
                                                 "train.batch_size=16", "ppo.mini_batch_size=8", model=str(sharp_tiny))))
    scores = _metric(out, "objective/scores")
    assert sorted(scores) == list(range(1, 31))
    first, last = sum(scores[s] for s in range(1, 6)) / 5, sum(scores[s] for s in range(26, 31)) / 5
    assert last > first + 0.12, (first, last)  # the aligned fraction starts near 0.5
    evals = _metric(out, "eval/score")
    assert evals[30] > evals[0] + 0.1, evals
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["step"] == 30 and "objective/kl" in r)
    for key in ["objective/rlhf_reward", "objective/entropy", "policy/approx_kl", "policy/clipfrac", "val/clipfrac",
                "val/explained_variance", "response/length", "response/ended_with_eos", "time/generate",
                "time/score", "time/train", "objective/kl_coef"]:
        assert key in step, key
    assert -1.0 < step["objective/kl"] < 20.0  # summed per completion (8 tokens); k1 samples may dip below 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    assert (out / "value" / "value_head.safetensors").is_file()


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_variants_learn(tmp_path: Path, advantage: str, sharp_tiny: Path) -> None:
    data = make_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "run"
    extra = ["ppo.kl_in=loss", "ppo.kl_estimator=k3"] if advantage == "grpo" else []
    train(load_config(PPOConfig, None, tiny_args(data, out, f"ppo.advantage={advantage}", "rollout.samples_per_prompt=4",
                                                 "train.batch_size=4", "train.max_steps=30", "train.lr=2e-3",
                                                 "ppo.kl_coef=0.01", *extra, model=str(sharp_tiny))))
    scores = _metric(out, "objective/scores")
    assert sum(scores[s] for s in range(26, 31)) / 5 > sum(scores[s] for s in range(1, 6)) / 5 + 0.1, scores
    assert not (out / "value").exists()


def test_separate_value_model_and_lora(tmp_path: Path) -> None:
    data = make_prompts(tmp_path / "prompts.jsonl", n=12)
    out = tmp_path / "run"
    train(load_config(PPOConfig, None, tiny_args(data, out, "value.mode=model", "lora.enabled=true", "train.max_steps=3",
                                                 "value.warmup_steps=1", "ppo.reward_norm=running",
                                                 "ppo.adaptive_kl=true", "ppo.target_kl=0.1")))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "objective/kl" in r}
    assert sorted(train_rows) == [1, 2, 3]
    assert train_rows[1]["policy/ratio"] == pytest.approx(1.0, abs=1e-6)  # warm-up: the policy did not move
    assert train_rows[3]["objective/kl_coef"] != pytest.approx(0.05)  # the adaptive controller moved it
    assert (out / "value" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "adapter_model.safetensors").is_file()


def test_value_model_starts_from_a_reward_model(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    """value.mode=model with value.init = a reward-model folder: the critic starts from its weights and head."""
    from safetensors.torch import load_file

    from rlhfkit.models.heads import build_reward_model
    from rlhfkit.models.load import ModelConfig

    rm = build_reward_model(ModelConfig(name="tiny:llama"), tokenizer, seed=5)
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "rm")
    data = make_prompts(tmp_path / "prompts.jsonl", n=12)
    out = tmp_path / "run"
    train(load_config(PPOConfig, None, tiny_args(data, out, "value.mode=model", f"value.init={tmp_path / 'rm'}",
                                                 "train.max_steps=1", "train.lr=1e-9")))
    saved = load_file(str(out / "value" / "model.safetensors"))
    torch.testing.assert_close(saved["score.weight"], rm.score.weight.detach(), atol=1e-6, rtol=0)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in rows if "val/mean" in r)["val/mean"] != 0.0  # a zero head would give exactly 0


def test_ppo_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_prompts(tmp_path / "prompts.jsonl", n=16)
    out = tmp_path / "run"
    args = tiny_args(data, out, "train.max_steps=4", "train.save_every=2", "train.save_total_limit=0",
                     "ppo.reward_norm=running", "ppo.adaptive_kl=true")
    train(load_config(PPOConfig, None, args))
    full = {k: _metric(out, k) for k in ("objective/scores", "policy/loss", "val/loss", "objective/kl_coef")}
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = _cli("ppo", *args, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for key, values in full.items():
        again = _metric(out, key)
        assert sorted(again) == [1, 2, 3, 4], key
        for step in (3, 4):
            assert again[step] == pytest.approx(values[step], abs=1e-6), (key, step)


def test_ppo_config_and_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    data = make_prompts(tmp_path / "prompts.jsonl")
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        load_config(PPOConfig, None, tiny_args(data, tmp_path / "r", "ppo.advantage=rloo"))
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(PPOConfig, None, tiny_args(data, tmp_path / "r", "train.grad_accum=2"))
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(PPOConfig, None, tiny_args(data, tmp_path / "r", "ppo.mini_batch_size=64"))
    with pytest.raises(ConfigError, match="kl_in"):
        load_config(PPOConfig, None, tiny_args(data, tmp_path / "r", "ppo.kl_in=loss"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"question": "no prompt"}, "{not json"])
    res = _cli("ppo", *tiny_args(bad, tmp_path / "r2"), cwd=tmp_path)
    assert res.returncode == 2
    assert "bad.jsonl:2" in res.stderr and "prompt" in res.stderr and "bad.jsonl:3" in res.stderr
    assert not (tmp_path / "r2").exists()
    res = _cli("ppo", *tiny_args(data, tmp_path / "r3", "reward.sources=sentimnet"), cwd=tmp_path)
    assert res.returncode == 2 and "reward.sources[0]" in res.stderr and not (tmp_path / "r3").exists()


def test_ppo_torchrun_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    data = make_prompts(tmp_path / "prompts.jsonl", n=16)
    out = tmp_path / "ddp"
    res = _cli("ppo", *tiny_args(data, out, "train.max_steps=3", "train.batch_size=4", "ppo.reward_norm=running",
                                 "train.save_every=2"), cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    scores = _metric(out, "objective/scores")
    assert sorted(scores) == [1, 2, 3]  # rank 0 logs once per step
    assert sorted(_metric(out, "eval/score")) == [0, 3]
    assert (out / "model" / "model.safetensors").is_file()
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["reward_moments"]["count"] == 2 * 2 * 4  # both ranks' scores, two steps


def test_isolated_rng_leaves_every_training_stream_untouched() -> None:
    import random

    import numpy as np

    from rlhfkit.runtime.seeding import isolated_rng, seed_everything

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(5)
    expected = draws()
    seed_everything(5)
    with isolated_rng(123):
        inside = draws()
    assert draws() == expected  # as if the block had not run
    with isolated_rng(123):
        assert draws() == inside  # every evaluation sees the same streams
