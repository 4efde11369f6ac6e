"""Rollout engine: sampler log-probs match a forward pass, masks and padding, greedy, seeds, chunking."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models.tiny import build_tiny
from rlhfkit.rollout.engine import Rollout, forward_logprobs, sample

# Different lengths, so the batch is left-padded.
PROMPTS = [[1, 4, 9, 16, 25, 36, 49, 64, 81], [7, 8], [100, 200, 300, 400, 500], [42]]


def _sharp(model: torch.nn.Module) -> torch.nn.Module:
    """A tiny model whose next token depends on the context and whose distributions are peaked.

    Freshly initialized tiny models are nearly uniform over 49k tokens (argmax margins ~1e-3 that float
    noise could flip, log-probs all about -ln V), and with tied embeddings greedy decoding just repeats the
    last token, which would hide position or padding mistakes. Larger block weights make attention and MLPs
    dominate the residual stream; a larger final norm sharpens the logits.
    """
    with torch.no_grad():
        for param in model.model.layers.parameters():
            if param.dim() == 2:
                param.mul_(10.0)
        model.model.norm.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, torch.nn.Module]:
    return {arch: _sharp(build_tiny(arch, tokenizer)) for arch in ("llama", "qwen2")}


def _every(step: int, vocab: int, offset: int = 0) -> list[int]:
    return list(range(offset, vocab, step))


def _check_layout(r: Rollout, pad_id: int, eos: set[int], max_new_tokens: int) -> None:
    mask = r.response_mask
    lengths = r.response_lengths
    assert r.response_ids.shape == mask.shape == r.logprobs.shape
    assert r.logprobs.dtype == torch.float32 and r.response_ids.dtype == torch.long
    assert r.response_ids.size(1) == int(lengths.max()) <= max_new_tokens  # R = longest response
    assert (lengths >= 1).all()
    assert torch.equal(mask, (torch.arange(mask.size(1))[None] < lengths[:, None]).long())  # contiguous from 0
    assert (r.response_ids[mask == 0] == pad_id).all()
    assert (r.logprobs[mask == 0] == 0).all()
    assert (r.logprobs[mask == 1] < 0).all()
    for row in range(len(r)):
        real = r.response_ids[row, : lengths[row]].tolist()
        hits = [i for i, t in enumerate(real) if t in eos]
        if r.ended[row]:
            assert hits == [len(real) - 1]  # EOS is the last real token, and the first EOS
        else:
            assert hits == [] and len(real) == max_new_tokens
    # Prompts: left-padded, mask 1 on the real tokens.
    for row, p in enumerate(PROMPTS[: len(r)]):
        width = r.prompt_ids.size(1)
        assert r.prompt_ids[row, width - len(p) :].tolist() == p
        assert r.prompt_mask[row].tolist() == [0] * (width - len(p)) + [1] * len(p)
        assert (r.prompt_ids[row, : width - len(p)] == pad_id).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_forward_pass(models, tokenizer, arch: str, temperature: float) -> None:
    model = models[arch]
    vocab = len(tokenizer)
    eos = _every(11, vocab, offset=2)  # ~9% of the vocabulary: some rows end early, some run out
    torch.manual_seed(0)
    r = sample(model, PROMPTS, pad_id=tokenizer.pad_token_id, eos_ids=eos, max_new_tokens=12, temperature=temperature)
    _check_layout(r, tokenizer.pad_token_id, set(eos), 12)
    assert r.response_mask.sum() > len(PROMPTS)  # more than one token per row somewhere
    with torch.no_grad():
        ref = forward_logprobs(model, r, temperature=temperature, chunk_size=5)
    assert ref.shape == r.logprobs.shape
    torch.testing.assert_close(r.logprobs, ref, atol=1e-4, rtol=0)
    assert (ref[r.response_mask == 0] == 0).all()
    # Filtering only picks the token: the recorded log-prob is still the untruncated one.
    torch.manual_seed(1)
    r = sample(model, PROMPTS, pad_id=tokenizer.pad_token_id, eos_ids=eos, max_new_tokens=8,
               temperature=temperature, top_k=50, top_p=0.8)
    with torch.no_grad():
        torch.testing.assert_close(r.logprobs, forward_logprobs(model, r, temperature=temperature), atol=1e-4, rtol=0)


def test_forward_logprobs_has_gradients(models, tokenizer) -> None:
    model = models["llama"]
    torch.manual_seed(0)
    r = sample(model, PROMPTS, pad_id=tokenizer.pad_token_id, eos_ids=tokenizer.eos_token_id, max_new_tokens=4)
    logps = forward_logprobs(model, r)
    logps.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_masks_when_rows_end_early_and_never(models, tokenizer) -> None:
    model = models["llama"]
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    half = _every(2, vocab)  # includes pad == eos == 2: a row's EOS may equal pad_id, still mask 1
    torch.manual_seed(3)
    r = sample(model, PROMPTS * 3, pad_id=pad, eos_ids=half, max_new_tokens=10)
    _check_layout(r, pad, set(half), 10)
    assert r.ended.all() and r.response_ids.size(1) < 10
    assert (r.response_ids.gather(1, r.response_lengths[:, None] - 1) % 2 == 0).all()

    # An EOS that can never be produced: every row runs the full budget.
    r = sample(model, PROMPTS, pad_id=pad, eos_ids=[vocab + 7], max_new_tokens=6)
    _check_layout(r, pad, {vocab + 7}, 6)
    assert not r.ended.any() and r.response_ids.size(1) == 6 and (r.response_lengths == 6).all()

    # pad_id == the EOS a row produces first: masks come from the stop logic, not from the ids.
    greedy = sample(model, PROMPTS, pad_id=pad, eos_ids=[vocab + 7], max_new_tokens=3, temperature=0)
    first = int(greedy.response_ids[1, 0])
    r = sample(model, PROMPTS, pad_id=first, eos_ids=[first], max_new_tokens=3, temperature=0)
    assert r.ended[1] and r.response_lengths[1] == 1 and r.response_ids[1, 0] == first
    assert r.response_mask[1].tolist() == [1] + [0] * (r.response_ids.size(1) - 1)
    assert r.logprobs[1, 0] < 0 and (r.logprobs[1, 1:] == 0).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_generate(models, tokenizer, arch: str) -> None:
    model = models[arch]
    pad = tokenizer.pad_token_id
    free = sample(model, PROMPTS, pad_id=pad, eos_ids=[len(tokenizer) + 7], max_new_tokens=10, temperature=0)
    assert len({tuple(row) for row in free.response_ids.tolist()}) == len(PROMPTS)  # not a copy of the input
    eos = [tokenizer.eos_token_id, int(free.response_ids[1, 3])]  # row 1 stops by step 4, others may run on
    r = sample(model, PROMPTS, pad_id=pad, eos_ids=eos, max_new_tokens=10, temperature=0)
    width = r.prompt_ids.size(1)
    with torch.no_grad():
        gen = model.generate(
            input_ids=r.prompt_ids, attention_mask=r.prompt_mask, max_new_tokens=10, do_sample=False,
            pad_token_id=pad, eos_token_id=eos, use_cache=True,
        )
    assert torch.equal(gen[:, width:], r.response_ids)
    assert r.ended[1] and r.response_lengths[1] <= 4 and r.response_lengths.max() > 4
    # Greedy log-probs are at temperature 1.
    with torch.no_grad():
        torch.testing.assert_close(r.logprobs, forward_logprobs(model, r, temperature=1.0), atol=1e-4, rtol=0)


def test_seeds_and_top_k_one(models, tokenizer) -> None:
    model = models["qwen2"]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_ids=_every(13, len(tokenizer)), max_new_tokens=8)
    torch.manual_seed(7)
    a = sample(model, PROMPTS, **kw)
    torch.manual_seed(7)
    b = sample(model, PROMPTS, **kw)
    for name in ("response_ids", "response_mask", "logprobs", "ended"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.manual_seed(8)
    c = sample(model, PROMPTS, **kw)
    assert not (a.response_ids.shape == c.response_ids.shape and torch.equal(a.response_ids, c.response_ids))

    greedy = sample(model, PROMPTS, **kw, temperature=0)
    torch.manual_seed(9)
    top1 = sample(model, PROMPTS, **kw, temperature=1.0, top_k=1)
    assert torch.equal(top1.response_ids, greedy.response_ids)
    torch.testing.assert_close(top1.logprobs, greedy.logprobs, atol=1e-5, rtol=0)


def test_batch_size_chunks_and_padding_invariance(models, tokenizer) -> None:
    model = models["llama"]
    pad = tokenizer.pad_token_id
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]
    kw = dict(pad_id=pad, eos_ids=_every(29, len(tokenizer), offset=2), max_new_tokens=9, temperature=0)
    whole = sample(model, prompts, **kw)
    chunked = sample(model, prompts, **kw, batch_size=2)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    torch.testing.assert_close(whole.logprobs, chunked.logprobs, atol=1e-5, rtol=0)

    for row, p in enumerate(prompts):
        alone = sample(model, [p], **kw)
        n = int(alone.response_lengths[0])
        assert int(whole.response_lengths[row]) == n
        assert whole.response_ids[row, :n].tolist() == alone.response_ids[0].tolist()
        torch.testing.assert_close(whole.logprobs[row, :n], alone.logprobs[0], atol=1e-5, rtol=0)


def test_eval_mode_is_restored_and_args_checked(models, tokenizer) -> None:
    model = models["llama"]
    model.train()
    sample(model, [[5, 6]], pad_id=tokenizer.pad_token_id, eos_ids=2, max_new_tokens=2)
    assert model.training
    model.eval()
    sample(model, [[5, 6]], pad_id=tokenizer.pad_token_id, eos_ids=2, max_new_tokens=2)
    assert not model.training
    for bad in (dict(max_new_tokens=0), dict(top_p=0.0), dict(temperature=-1.0), dict(top_k=-1)):
        args = dict(pad_id=0, eos_ids=2, max_new_tokens=2) | bad
        with pytest.raises(ValueError):
            sample(model, [[5, 6]], **args)
    with pytest.raises(ValueError):
        sample(model, [[]], pad_id=0, eos_ids=2, max_new_tokens=2)


def test_rollout_select_position_ids_and_to() -> None:
    r = Rollout(
        prompt_ids=torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]]),
        prompt_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]),
        response_ids=torch.tensor([[12, 2, 0], [13, 14, 15], [2, 0, 0]]),
        response_mask=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]),
        logprobs=torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, -0.1], [-3.0, 0.0, 0.0]]),
        ended=torch.tensor([True, False, True]),
    )
    assert r.input_ids.shape == (3, 7) and r.input_ids[1].tolist() == [7, 8, 9, 10, 13, 14, 15]
    assert r.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 0]
    assert r.position_ids.tolist() == [
        [0, 0, 0, 1, 2, 3, 3],  # left padding does not shift positions; trailing padding repeats the last
        [0, 1, 2, 3, 4, 5, 6],
        [0, 0, 0, 0, 1, 1, 1],
    ]
    assert r.response_lengths.tolist() == [2, 3, 1]
    sub = r.select([2, 0])
    assert len(sub) == 2
    assert sub.response_ids.tolist() == [[2, 0, 0], [12, 2, 0]] and sub.ended.tolist() == [True, True]
    assert torch.equal(sub.position_ids, r.position_ids[[2, 0]])
    by_mask = r.select(torch.tensor([False, True, False]))
    assert by_mask.prompt_ids.tolist() == [[7, 8, 9, 10]] and by_mask.logprobs.dtype == torch.float32
    moved = r.to("cpu")
    assert all(torch.equal(getattr(moved, n), getattr(r, n)) for n in ("prompt_ids", "logprobs", "ended"))
