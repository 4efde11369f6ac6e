"""Tokenized examples -> tensors: right-padded batches, and packed batches with position resets.

Packing concatenates short examples into rows of `max_length` tokens. Each example keeps its own
positions (0, 1, 2, ... restarting at every example) and the batch carries no 2D attention mask:
transformers then derives a block-diagonal causal mask from the position resets, so no token attends
across an example boundary (sdpa and eager attention both support this). Padding at the end of a
packed row starts its own block and carries no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.tokenize import IGNORE, TokenizedExample


def _right_padded(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids padded with pad_id and labels padded with IGNORE, both (B, longest)."""
    longest = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    out_labels = torch.full((len(seqs), longest), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        out_labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, out_labels


def pad_batch(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Returns input_ids, attention_mask, labels: (B, T)."""
    input_ids, labels = _right_padded([e.input_ids for e in examples], [e.labels for e in examples], pad_id)
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    num_examples: int


def pack_examples(examples: list[TokenizedExample], max_length: int) -> list[PackedRow]:
    """Greedy packing in order: fill each row up to `max_length`, start a new one when full.

    Order-preserving (not bin-packing) so the result is a pure function of the input order, which
    keeps shuffling, sharding and resume exact.
    """
    rows: list[PackedRow] = []
    cur = PackedRow([], [], [], 0)
    for ex in examples:
        n = len(ex.input_ids)
        if cur.num_examples and len(cur.input_ids) + n > max_length:
            rows.append(cur)
            cur = PackedRow([], [], [], 0)
        cur.input_ids.extend(ex.input_ids)
        labels = list(ex.labels)
        labels[0] = IGNORE  # never predict an example's first token from the previous example
        cur.labels.extend(labels)
        cur.position_ids.extend(range(n))
        cur.num_examples += 1
    if cur.num_examples:
        rows.append(cur)
    return rows


def packed_batch(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack packed rows, padded to the longest. No attention_mask: boundaries come from position_ids."""
    input_ids, labels = _right_padded([r.input_ids for r in rows], [r.labels for r in rows], pad_id)
    longest = input_ids.shape[1]
    position_ids = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        position_ids[i, :n] = torch.tensor(r.position_ids)
        position_ids[i, n:] = torch.arange(longest - n)  # padding forms its own block
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
