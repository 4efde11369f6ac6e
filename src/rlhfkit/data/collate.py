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


# --------------------------------------------------------------------------------------------------
# Preference pairs with the prompt computed once

PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
"""Segment ids of a shared-prompt row."""


@dataclass
class SharedPromptBatch:
    """B pairs, one row each: `prompt | chosen response | rejected response`, right-padded to T.

    The rejected tokens attend to the prompt and to themselves, never to the chosen tokens, and their
    positions continue from the prompt's end, so each response sees exactly the context it has in its
    own prompt+response sequence: the same log-probs as two padded rows, with the prompt's tokens
    computed once and no pad rows. `keep` lists the positions whose logits are needed (the union over
    rows of the positions that predict a response token); `rows`/`cols`/`targets`/`seq` describe
    each predicted token: its row, its column in `keep`, its token id, and its sequence in the padded
    layout's order (pair i's chosen = i, its rejected = B + i).
    """

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    segments: torch.Tensor  # (B, T) PREFIX / CHOSEN / REJECTED / PAD
    keep: torch.Tensor  # (K,) sorted positions
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,) index into keep
    targets: torch.Tensor  # (N,)
    seq: torch.Tensor  # (N,) in [0, 2B)

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 1, T, T) mask: bool (True = attend) or, with `dtype`, additive (0 / dtype's min).

        Pad positions attend to themselves only, so no query row is empty (an all-masked row gives
        NaN in sdpa, and NaN activations poison the weight gradients even where the loss ignores them).
        """
        seg = self.segments
        t = seg.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        sq, sk = seg[:, :, None], seg[:, None, :]
        allowed = causal & ((sk == PREFIX) | (sk == sq)) & (sk != PAD)
        allowed |= torch.eye(t, dtype=torch.bool, device=seg.device) & (sq == PAD)
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def to(self, device: torch.device) -> SharedPromptBatch:
        return SharedPromptBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    @property
    def num_tokens(self) -> int:
        return int((self.segments != PAD).sum())


def _shared_prefix(chosen: TokenizedExample, rejected: TokenizedExample) -> int:
    """Length of the common prompt: the common prefix of both sequences, up to either's first label."""
    limit = min(len(chosen.input_ids), len(rejected.input_ids))
    for ex in (chosen, rejected):
        first = next((j for j, lab in enumerate(ex.labels) if lab != IGNORE), len(ex.labels))
        limit = min(limit, first)
    n = 0
    while n < limit and chosen.input_ids[n] == rejected.input_ids[n]:
        n += 1
    return n


def shared_prompt_batch(chosen: list[TokenizedExample], rejected: list[TokenizedExample], pad_id: int) -> SharedPromptBatch:
    """Lay out pairs as `SharedPromptBatch` rows; `chosen[i]` and `rejected[i]` form pair i.

    Labels follow `token_logprobs`: token j of a sequence is predicted by position j - 1 of that
    sequence (a label at position 0 predicts nothing). In the row, the chosen sequence keeps its
    positions and the rejected sequence's tokens after the prompt move up by the chosen response's
    length; position P - 1 (the prompt's last token) predicts the first response token of both.
    """
    b = len(chosen)
    layout = []
    for c, r in zip(chosen, rejected):
        p = _shared_prefix(c, r)
        layout.append((p, c.input_ids[p:], r.input_ids[p:], c, r))
    longest = max(p + len(cs) + len(rs) for p, cs, rs, _, _ in layout)
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)
    segments = torch.full((b, longest), PAD, dtype=torch.long)
    position_ids = torch.zeros((b, longest), dtype=torch.long)
    entries: list[tuple[int, int, int, int]] = []  # row, row position, target, sequence
    for i, (p, cs, rs, c, r) in enumerate(layout):
        ids = c.input_ids[:p] + cs + rs
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        segments[i, p : p + len(cs)] = CHOSEN
        segments[i, :p] = PREFIX
        segments[i, p + len(cs) : n] = REJECTED
        position_ids[i, :n] = torch.tensor(list(range(p + len(cs))) + list(range(p, p + len(rs))))
        position_ids[i, n:] = torch.arange(longest - n)
        for ex, shift, seq in ((c, 0, i), (r, len(cs), b + i)):
            for j in range(1, len(ex.labels)):
                if ex.labels[j] != IGNORE:
                    before = j - 1
                    entries.append((i, before if before < p else before + shift, ex.labels[j], seq))
    if not entries:
        raise ValueError("no response tokens to score in this batch")
    keep = sorted({pos for _, pos, _, _ in entries})
    col = {pos: k for k, pos in enumerate(keep)}
    rows, positions, targets, seq = (list(x) for x in zip(*entries))
    return SharedPromptBatch(input_ids, position_ids, segments, torch.tensor(keep), torch.tensor(rows),
                             torch.tensor([col[q] for q in positions]), torch.tensor(targets), torch.tensor(seq))
