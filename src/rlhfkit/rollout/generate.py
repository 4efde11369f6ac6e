"""Portable batched generation for sample logging, candidate answers and before/after comparisons.

Prompts are left-padded so that every row's last prompt token sits at the same position and new
tokens are appended in lockstep; `position_ids` follow the attention mask (transformers derives them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.runtime.optim import autocast


@dataclass
class Completion:
    token_ids: list[int]
    """New tokens, EOS excluded."""
    ended: bool
    """True when the model produced EOS within the budget."""
    text: str


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> list[Completion]:
    """Complete each prompt (temperature 0 = greedy). Sampling draws from the global torch RNG.

    `autocast_dtype` (e.g. bf16): the forward passes run under autocast; weights keep their dtype and
    the sampling distribution is the softmax of the autocast logits."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        longest = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        kwargs = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        with autocast(device, autocast_dtype):
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                use_cache=True,
                **kwargs,
            )
        for row in gen[:, longest:].tolist():
            ended = eos in row
            if ended:
                row = row[: row.index(eos)]
            out.append(Completion(row, ended, tokenizer.decode(row, skip_special_tokens=True).strip()))
    model.train(was_training)
    return out


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    **kwargs: object,
) -> list[tuple[str, int, bool]]:
    """(text, number of new tokens including EOS, ended with EOS) per prompt; see `generate`."""
    return [(c.text, len(c.token_ids) + int(c.ended), c.ended) for c in generate(model, tokenizer, prompt_ids, **kwargs)]
