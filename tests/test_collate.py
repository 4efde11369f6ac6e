"""rlhfkit.data.collate (padding, packing) and rlhfkit.data.sampler.BatchSampler."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.collate import (
    CHOSEN,
    PAD,
    PREFIX,
    REJECTED,
    PackedRow,
    pack_examples,
    packed_batch,
    pad_batch,
    shared_prompt_batch,
)
from rlhfkit.data.sampler import BatchSampler
from rlhfkit.data.tokenize import IGNORE, TokenizedExample


def ex(ids: list[int], labels: list[int] | None = None, where: str = "f") -> TokenizedExample:
    return TokenizedExample(where, list(ids), list(labels if labels is not None else ids))


# --------------------------------------------------------------------------------------------------
# pad_batch


def test_pad_batch_shapes_masks_labels():
    batch = pad_batch([ex([1, 2, 3], [IGNORE, 2, 3]), ex([4, 5], [IGNORE, 5])], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, 5, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_batch_single_example_no_padding():
    batch = pad_batch([ex([7, 8])], pad_id=9)
    assert batch["input_ids"].tolist() == [[7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1]]


# --------------------------------------------------------------------------------------------------
# pack_examples / packed_batch


def test_pack_examples_greedy_in_order():
    exs = [ex([1, 2, 3]), ex([4, 5]), ex([6, 7, 8, 9]), ex([10]), ex([11, 12, 13, 14, 15, 16])]
    rows = pack_examples(exs, max_length=6)
    # [1,2,3]+[4,5]=5, +4 > 6 -> new row; [6..9]+[10]=5; +6 > 6 -> new row; [11..16]
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    assert [r.num_examples for r in rows] == [2, 2, 1]
    assert [r.position_ids for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5]]


def test_pack_examples_does_not_reorder_to_fill_gaps():
    # A later short example that would fit in an earlier row is not moved there.
    rows = pack_examples([ex([1, 2, 3, 4]), ex([5, 6, 7]), ex([8])], max_length=5)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_pack_examples_exact_fit():
    rows = pack_examples([ex([1, 2]), ex([3, 4])], max_length=4)
    assert len(rows) == 1 and rows[0].input_ids == [1, 2, 3, 4]


def test_pack_examples_first_label_of_every_example_is_ignored():
    exs = [ex([1, 2, 3], [1, 2, 3]), ex([4, 5], [4, 5]), ex([6, 7], [IGNORE, 7])]
    (row,) = pack_examples(exs, max_length=100)
    assert row.labels == [IGNORE, 2, 3, IGNORE, 5, IGNORE, 7]
    assert exs[0].labels == [1, 2, 3]  # inputs untouched


def test_pack_examples_empty():
    assert pack_examples([], max_length=8) == []


def test_packed_batch_pads_with_its_own_position_block():
    rows = [PackedRow([1, 2, 3, 4, 5], [IGNORE, 2, 3, IGNORE, 5], [0, 1, 2, 0, 1], 2),
            PackedRow([6, 7], [IGNORE, 7], [0, 1], 1)]
    batch = packed_batch(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5], [IGNORE, 7, IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert all(t.dtype == torch.long for t in batch.values())


# --------------------------------------------------------------------------------------------------
# Packed rows must not attend across example boundaries


PACK = [[1, 520, 3311, 42, 978], [1, 77, 88], [1, 4000, 5000, 6000, 7000, 8000]]


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from rlhfkit.models.tiny import build_tiny

    return build_tiny("llama", tokenizer).eval()


def _packed_vs_alone(model, tokenizer, **call_kwargs) -> list[float]:
    rows = pack_examples([ex(ids) for ids in PACK], max_length=64)
    assert len(rows) == 1 and rows[0].num_examples == 3
    batch = packed_batch(rows, tokenizer.pad_token_id)
    batch.pop("labels")
    assert "attention_mask" not in batch
    diffs = []
    with torch.no_grad():
        packed = model(**batch, **call_kwargs).logits[0]
        start = 0
        for ids in PACK:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            diffs.append((packed[start : start + len(ids)] - alone).abs().max().item())
            start += len(ids)
    return diffs


def test_packed_rows_do_not_attend_across_examples_without_cache(tiny_llama, tokenizer):
    # With the KV cache off, transformers derives a block-diagonal mask from the position resets.
    diffs = _packed_vs_alone(tiny_llama, tokenizer, use_cache=False)
    assert max(diffs) < 1e-5, diffs


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_packed_rows_do_not_attend_across_examples(tokenizer, mode):
    from rlhfkit.models.tiny import build_tiny

    model = build_tiny("llama", tokenizer)
    model.train(mode == "train")  # tiny models have dropout off, so train mode is deterministic too
    diffs = _packed_vs_alone(model, tokenizer)
    assert max(diffs) < 1e-5, diffs


# --------------------------------------------------------------------------------------------------
# BatchSampler


def take(sampler: BatchSampler, n: int) -> list[list[int]]:
    return [sampler.next() for _ in range(n)]


def test_sampler_same_seed_same_batches():
    a = take(BatchSampler(10, 3, seed=5), 8)
    b = take(BatchSampler(10, 3, seed=5), 8)
    assert a == b
    assert a != take(BatchSampler(10, 3, seed=6), 8)


def test_sampler_epoch_is_a_permutation_padded_by_wrapping():
    s = BatchSampler(10, 3, seed=1)
    assert s.batches_per_epoch() == 4
    epoch = take(s, 4)
    assert all(len(b) == 3 for b in epoch)
    flat = [i for b in epoch for i in b]
    assert sorted(flat[:10]) == list(range(10))
    assert flat[10:] == flat[:2]  # the short last batch is filled from the start of the epoch
    assert (s.epoch, s.batch) == (0, 4)
    s.next()
    assert (s.epoch, s.batch) == (1, 1)


def test_sampler_new_order_each_epoch():
    s = BatchSampler(20, 5, seed=0)
    e0, e1 = take(s, 4), take(s, 4)
    assert e0 != e1
    assert sorted(i for b in e1 for i in b) == list(range(20))


def test_sampler_no_shuffle():
    assert take(BatchSampler(5, 2, seed=0, shuffle=False), 3) == [[0, 1], [2, 3], [4, 0]]


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 5, 9])
def test_sampler_resume_gives_the_exact_next_batches(consumed):
    # 10 items, batch 3 -> 4 batches per epoch; consumed=4 and 8 sit exactly on an epoch boundary.
    ref = BatchSampler(10, 3, seed=11)
    expected = take(ref, consumed + 6)[consumed:]
    run = BatchSampler(10, 3, seed=11)
    take(run, consumed)
    state = run.state_dict()
    resumed = BatchSampler(10, 3, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == expected


def test_sampler_state_restores_the_seed():
    run = BatchSampler(10, 3, seed=11)
    take(run, 2)
    state = run.state_dict()
    assert state == {"epoch": 0, "batch": 2, "seed": 11, "num_items": 10}
    resumed = BatchSampler(10, 3, seed=999)
    resumed.load_state_dict(state)
    assert take(resumed, 3) == take(run, 3)


def test_sampler_resume_with_different_num_items():
    state = BatchSampler(10, 3, seed=0).state_dict()
    from rlhfkit.errors import RlhfkitError

    with pytest.raises(RlhfkitError) as info:
        BatchSampler(11, 3, seed=0).load_state_dict(state)
    assert str(info.value) == (
        "the checkpoint was taken on 10 training items but the data now has 11; resume needs the same data"
    )


@pytest.mark.parametrize("num_items", [12, 10, 3])
def test_sampler_ranks_get_disjoint_slices_covering_the_epoch(num_items):
    r0 = BatchSampler(num_items, 3, seed=7, rank=0, world_size=2)
    r1 = BatchSampler(num_items, 3, seed=7, rank=1, world_size=2)
    single = BatchSampler(num_items, 6, seed=7)  # the global batches
    assert r0.batches_per_epoch() == r1.batches_per_epoch() == single.batches_per_epoch()
    seen = []
    for _ in range(r0.batches_per_epoch()):
        a, b, g = r0.next(), r1.next(), single.next()
        assert len(a) == len(b) == 3
        assert a + b == g  # rank r takes its own slice of the global batch
        if num_items >= 6:
            assert set(a).isdisjoint(b)
        seen += a + b
    assert set(seen) == set(range(num_items))
    assert sorted(seen[:num_items]) == list(range(num_items))  # padding only after the full permutation


def test_sampler_group_by_length_batches_similar_lengths():
    lengths = [(i * 37) % 100 for i in range(64)]
    s = BatchSampler(64, 8, seed=3, lengths=lengths, group_by_length=True)
    batches = take(s, 8)
    assert sorted(i for b in batches for i in b) == list(range(64))
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    # 64 items fit in one chunk of 32 global batches: sorted by length, descending.
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    random_spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in take(BatchSampler(64, 8, seed=3), 8)]
    assert sum(spans) < sum(random_spans) / 3


def test_sampler_group_by_length_without_lengths_is_plain_shuffle():
    assert take(BatchSampler(10, 3, seed=2, group_by_length=True), 4) == take(BatchSampler(10, 3, seed=2), 4)


def test_sampler_needs_items():
    with pytest.raises(ValueError) as info:
        BatchSampler(0, 3, seed=0)
    assert str(info.value) == "BatchSampler needs at least one item"


# --------------------------------------------------------------------------------------------------
# shared_prompt_batch (DPO: the prompt once, then both responses)


def test_shared_prompt_layout_by_hand():
    # Pair 0: prompt [1, 2], chosen [3, 4], rejected [5]. Pair 1: prompt [6], chosen [7], rejected [8, 9].
    chosen = [ex([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]), ex([6, 7], [IGNORE, 7])]
    rejected = [ex([1, 2, 5], [IGNORE, IGNORE, 5]), ex([6, 8, 9], [IGNORE, 8, 9])]
    b = shared_prompt_batch(chosen, rejected, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b.segments.tolist() == [[PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED], [PREFIX, CHOSEN, REJECTED, REJECTED, PAD]]
    # The rejected response continues from the prompt's end, as in its own sequence.
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    # (row, predicting position, target, sequence): the prompt's last token predicts both first tokens.
    got = sorted(zip(b.rows.tolist(), b.keep[b.cols].tolist(), b.targets.tolist(), b.seq.tolist()))
    assert got == sorted([(0, 1, 3, 0), (0, 2, 4, 0), (0, 1, 5, 2),
                          (1, 0, 7, 1), (1, 0, 8, 3), (1, 2, 9, 3)])
    assert b.keep.tolist() == [0, 1, 2]  # no logits at positions that predict nothing
    assert b.num_tokens == 9


def test_shared_prompt_attention_mask():
    chosen = [ex([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])]
    rejected = [ex([1, 2, 5, 6], [IGNORE, IGNORE, 5, 6])]
    b = shared_prompt_batch(chosen + [ex([7, 8], [IGNORE, 8])], rejected + [ex([7, 9], [IGNORE, 9])], pad_id=0)
    m = b.attention_mask()
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # chosen: the prompt and itself
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # rejected: the prompt and itself, never the chosen tokens
        [1, 1, 0, 0, 1, 1],
    ]
    # Padding attends to itself only (no empty query row) and nothing attends to it.
    assert m[1, 0, 3:, 3:].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert not m[1, 0, :3, 3:].any()
    additive = b.attention_mask(torch.float32)
    assert additive.dtype == torch.float32
    assert ((additive == 0) == m).all() and (additive[~m] == torch.finfo(torch.float32).min).all()


def test_shared_prompt_without_common_prefix_or_with_truncated_prompts():
    # Left truncation gave the two sequences different first tokens: nothing is shared, both still scored.
    chosen, rejected = ex([1, 2, 3], [IGNORE, IGNORE, 3]), ex([9, 2, 4], [IGNORE, IGNORE, 4])
    b = shared_prompt_batch([chosen], [rejected], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 9, 2, 4]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert sorted(zip(b.keep[b.cols].tolist(), b.targets.tolist(), b.seq.tolist())) == [(1, 3, 0), (4, 4, 1)]
    # A response that starts with the same token as the other does not join the prompt.
    chosen, rejected = ex([1, 5, 6], [IGNORE, 5, 6]), ex([1, 5, 7], [IGNORE, 5, 7])
    b = shared_prompt_batch([chosen], [rejected], pad_id=0)
    assert b.segments.tolist() == [[PREFIX, CHOSEN, CHOSEN, REJECTED, REJECTED]]
    with pytest.raises(ValueError, match="no response tokens"):
        shared_prompt_batch([ex([1, 2], [IGNORE, IGNORE])], [ex([1, 2], [IGNORE, IGNORE])], pad_id=0)
