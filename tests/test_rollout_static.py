"""Static rollout engine (StaticCache, full-length mask, fixed-shape steps): same contract as the dynamic one."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models.tiny import build_tiny
from rlhfkit.rollout import engine as rollout_engine
from rlhfkit.rollout.engine import forward_logprobs, sample
from tests.test_rollout import PROMPTS, _check_layout, _every, _sharp

FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended")


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, torch.nn.Module]:
    return {arch: _sharp(build_tiny(arch, tokenizer)) for arch in ("llama", "qwen2")}


def _assert_same(a, b, atol: float = 1e-5) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_static_equals_dynamic(models, tokenizer, arch: str) -> None:
    model = models[arch]
    pad = tokenizer.pad_token_id
    kw = dict(pad_id=pad, max_new_tokens=10, temperature=0)
    free = sample(model, PROMPTS, eos_ids=[len(tokenizer) + 7], **kw)
    assert len({tuple(row) for row in free.response_ids.tolist()}) == len(PROMPTS)  # context-dependent
    _assert_same(sample(model, PROMPTS, eos_ids=[len(tokenizer) + 7], **kw, engine="static"), free)
    # Row 1 (a short, heavily left-padded prompt) ends by step 4 while others run on: ended rows keep
    # being fed pad with attention 0, which must not disturb the live rows.
    eos = [tokenizer.eos_token_id, int(free.response_ids[1, 3])]
    dynamic = sample(model, PROMPTS, eos_ids=eos, **kw)
    static = sample(model, PROMPTS, eos_ids=eos, **kw, engine="static")
    _assert_same(static, dynamic)
    _check_layout(static, pad, set(eos), 10)
    assert static.ended[1] and static.response_lengths[1] <= 4 and static.response_lengths.max() > 4
    # Chunks have their own P and their own static cache; the result is the same.
    _assert_same(sample(model, PROMPTS, eos_ids=eos, **kw, engine="static", batch_size=3), dynamic)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_static_sampler_logprobs_match_forward_pass(models, tokenizer, arch: str, temperature: float) -> None:
    model = models[arch]
    pad = tokenizer.pad_token_id
    eos = _every(11, len(tokenizer), offset=2)  # some rows end early, some run out
    torch.manual_seed(0)
    r = sample(model, PROMPTS * 2, pad_id=pad, eos_ids=eos, max_new_tokens=12, temperature=temperature,
               engine="static")
    _check_layout(r, pad, set(eos), 12)
    assert r.ended.any() and r.response_mask.sum() > 2 * len(PROMPTS)
    with torch.no_grad():
        ref = forward_logprobs(model, r, temperature=temperature)
    torch.testing.assert_close(r.logprobs, ref, atol=1e-4, rtol=0)
    # top-k / top-p only choose the token; the recorded log-prob is the untruncated one.
    torch.manual_seed(1)
    r = sample(model, PROMPTS, pad_id=pad, eos_ids=eos, max_new_tokens=8, temperature=temperature,
               top_k=50, top_p=0.8, engine="static")
    with torch.no_grad():
        torch.testing.assert_close(r.logprobs, forward_logprobs(model, r, temperature=temperature), atol=1e-4, rtol=0)
    # Seeded runs repeat exactly.
    torch.manual_seed(2)
    a = sample(model, PROMPTS, pad_id=pad, eos_ids=eos, max_new_tokens=6, temperature=temperature, engine="static")
    torch.manual_seed(2)
    b = sample(model, PROMPTS, pad_id=pad, eos_ids=eos, max_new_tokens=6, temperature=temperature, engine="static")
    _assert_same(a, b, atol=0)


def test_static_stops_when_all_rows_end(models, tokenizer, monkeypatch) -> None:
    model = models["llama"]
    pad = tokenizer.pad_token_id
    half = _every(2, len(tokenizer))  # includes pad == eos == 2
    calls = []
    real_step = rollout_engine._decode_step
    monkeypatch.setattr(rollout_engine, "_decode_step", lambda *a: calls.append(1) or real_step(*a))
    torch.manual_seed(3)
    r = sample(model, PROMPTS * 3, pad_id=pad, eos_ids=half, max_new_tokens=10, engine="static")
    _check_layout(r, pad, set(half), 10)
    assert r.ended.all() and r.response_ids.size(1) < 10
    assert len(calls) == r.response_ids.size(1) - 1  # CPU checks every step: no step after the last end
    # An EOS that is never produced: every row runs the full budget.
    r = sample(model, PROMPTS, pad_id=pad, eos_ids=[len(tokenizer) + 7], max_new_tokens=6, engine="static")
    _check_layout(r, pad, {len(tokenizer) + 7}, 6)
    assert not r.ended.any() and r.response_ids.size(1) == 6
    # One new token: prefill only.
    r = sample(model, PROMPTS, pad_id=pad, eos_ids=2, max_new_tokens=1, temperature=0, engine="static")
    g = sample(model, PROMPTS, pad_id=pad, eos_ids=2, max_new_tokens=1, temperature=0)
    _assert_same(r, g)


def test_static_args_and_eval_mode(models, tokenizer) -> None:
    model = models["qwen2"]
    with pytest.raises(ValueError):
        sample(model, [[5, 6]], pad_id=0, eos_ids=2, max_new_tokens=2, engine="vllm")
    with pytest.raises(ValueError):
        sample(model, [[5, 6]], pad_id=0, eos_ids=2, max_new_tokens=2, compile=True)  # dynamic engine
    model.train()
    sample(model, [[5, 6]], pad_id=tokenizer.pad_token_id, eos_ids=2, max_new_tokens=3, engine="static")
    assert model.training
    model.eval()


@pytest.mark.slow
def test_compiled_static_equals_eager(models, tokenizer) -> None:
    """torch.compile of the decode step (inductor on CPU; CUDA graphs only on CUDA). Compiles for ~30 s."""
    model = models["llama"]
    pad = tokenizer.pad_token_id
    rollout_engine.clear_static_engine()
    kw = dict(pad_id=pad, max_new_tokens=8, temperature=0, engine="static")
    free = sample(model, PROMPTS, eos_ids=[len(tokenizer) + 7], **kw)
    eos = [tokenizer.eos_token_id, int(free.response_ids[1, 2])]
    eager = sample(model, PROMPTS, eos_ids=eos, **kw)
    compiled = sample(model, PROMPTS, eos_ids=eos, **kw, compile=True)
    _assert_same(compiled, eager)
    assert len(rollout_engine._COMPILED_STEPS) == 1 and len(rollout_engine._STATIC_CACHES) == 1
    again = sample(model, PROMPTS, eos_ids=eos, **kw, compile=True)  # same shape: cached step and cache, reset
    _assert_same(again, eager)
    assert len(rollout_engine._COMPILED_STEPS) == 1 and len(rollout_engine._STATIC_CACHES) == 1
    rollout_engine.clear_static_engine()
