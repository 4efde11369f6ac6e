"""Rollout engine for PPO, RLOO and GRPO on language models: batched sampling with log-probs in one pass.

`sample` completes a batch of prompts and returns a `Rollout`: the prompt and response token ids, their
masks, and the log-prob of every sampled token, all recorded while sampling. An RL step needs the
behaviour policy's log-probs of the tokens it drew (PPO's importance ratio pi_new / pi_old, the KL
estimate against a reference); taking them from the sampler's own logits saves a second forward pass
over every rollout.

Those log-probs must equal what a later full forward pass of the same weights gives (`forward_logprobs`):
a systematic mismatch shifts every ratio away from 1 at the first PPO epoch, so clipping triggers on
data that is in fact on-policy and the gradient is biased. The sampler therefore records
`log_softmax(logits / temperature)` of the chosen token, in float32, with the same left-padded layout and
the same `position_ids` as the training forward, and `forward_logprobs` uses the same temperature. Two
choices follow from that:
- top-k / top-p filtering only chooses the token; the recorded log-prob is from the full, untruncated
  distribution (the one the policy forward computes). Sampling with them is therefore slightly
  off-policy: tokens outside the nucleus are never drawn even though the recorded policy gives them mass.
- temperature 0 is greedy decoding (argmax), and its log-probs are at temperature 1; score such rollouts
  with `forward_logprobs(..., temperature=1.0)`.

Padding conventions (`Rollout`):
- prompts are LEFT-padded with `pad_id` to a common length P, so every row's next token is appended at
  the same column and a step is one batched forward with a one-token input per row;
- responses are RIGHT-padded with `pad_id` to R columns, R being the longest response (at most
  `max_new_tokens`); a row's response stops at its first EOS, which is kept (mask 1);
- `position_ids` count real tokens only, `cumsum(attention_mask) - 1` clamped at 0, so left padding does not
  shift a row's positions and a prompt gives the same tokens alone or inside a padded batch;
- padding is never attended to (mask 0), and padding log-probs are exactly 0. `pad_id` may be an EOS id
  (SmolLM2 pads with its EOS): masks come from the stop logic, never from comparing ids with `pad_id`.

Sampling draws with `torch.multinomial` from the global torch RNG, so a seeded run is reproducible and a
resumed run (which restores the RNG states) continues exactly.

This is the portable engine: plain eager forwards with a transformers `DynamicCache`, on any device
(CPU, CUDA, MPS). A CUDA fast path (static KV cache + CUDA graphs, or vLLM) is planned as a second engine
behind the same `sample` interface.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from rlhfkit.losses.logprobs import IGNORE, token_logprobs

# How often the sampler checks whether every row has ended, on accelerators where the check is a device
# sync (on CPU it is free and runs every step). Steps run past the end cost a forward each; trailing
# all-padding columns are trimmed, so R does not depend on this.
_CHECK_EVERY = 4


@dataclass
class Rollout:
    """A batch of sampled completions. Prompts are left-padded, responses right-padded (see module doc)."""

    prompt_ids: torch.Tensor
    """(B, P) long, left-padded with pad_id."""
    prompt_mask: torch.Tensor
    """(B, P) long, 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """(B, R) long, right-padded with pad_id; includes the EOS token when the row ended."""
    response_mask: torch.Tensor
    """(B, R) long, 1 on real response tokens (EOS included), contiguous from column 0."""
    logprobs: torch.Tensor
    """(B, R) float32: log-prob of each sampled token under softmax(logits / temperature); 0 on padding."""
    ended: torch.Tensor
    """(B,) bool: the row produced an EOS within max_new_tokens."""

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P+R) prompt then response ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P+R) 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, P+R) positions counting real tokens only: cumsum(attention_mask) - 1, clamped at 0."""
        return position_ids_from_mask(self.attention_mask)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) long: number of response tokens per row (EOS included)."""
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def select(self, index: torch.Tensor | list[int]) -> Rollout:
        """The rows in `index` (indices or a boolean mask), e.g. a minibatch; columns are kept as they are."""
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index, dtype=torch.long)
        index = index.to(self.prompt_ids.device)
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1 clamped at 0: positions of real tokens, unaffected by left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    eos_ids: int | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 0,
) -> Rollout:
    """Complete every prompt and record the sampled tokens' log-probs (see the module doc).

    temperature 0 = greedy (log-probs at temperature 1); top_k 0 and top_p 1.0 = no filtering (filtering
    only chooses the token, the log-prob is the untruncated one). batch_size 0 samples all prompts at
    once, otherwise in chunks of batch_size whose rollouts are concatenated (padded to common P and R).
    The model is put in eval mode and restored afterwards; tensors come back on the model's device.
    """
    if not prompt_ids:
        raise ValueError("sample: expected at least one prompt")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"sample: top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    if batch_size < 0:
        raise ValueError(f"sample: batch_size must be >= 0, got {batch_size}")
    eos_list = [int(eos_ids)] if isinstance(eos_ids, int) else sorted({int(e) for e in eos_ids})
    if not eos_list:
        raise ValueError("sample: expected at least one EOS id")

    device = next(model.parameters()).device
    eos = torch.tensor(eos_list, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        step = batch_size if batch_size > 0 else len(prompt_ids)
        parts = [
            _sample_chunk(
                model, prompt_ids[start : start + step], device=device, pad_id=pad_id, eos=eos,
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            )
            for start in range(0, len(prompt_ids), step)
        ]
    finally:
        model.train(was_training)
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, pad_id=pad_id)


def _sample_chunk(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    device: torch.device,
    pad_id: int,
    eos: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> Rollout:
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    batch = prompt_ids.size(0)
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    cache = DynamicCache(config=_unwrap(model).config)
    # Prefill. No cache_position: transformers 5 derives the query offset from the cache length, which
    # grows by one column per step for every row (ended rows are fed pad_id with attention 0).
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        past_key_values=cache,
        use_cache=True,
        **keep,
    )
    logits = out.logits[:, -1]
    attention = prompt_mask
    n_real = prompt_mask.sum(-1)  # (B,) real tokens seen so far
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), pad_id, dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else _CHECK_EVERY
    ids, logps, masks = [], [], []
    for t in range(max_new_tokens):
        token, logp = _pick(logits, temperature, top_k, top_p)
        token = torch.where(alive, token, pad)
        ids.append(token)
        logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
        masks.append(alive)
        fed = alive.long()  # the token just chosen (EOS included) is real for rows alive when choosing it
        alive = alive & ~torch.isin(token, eos)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and not bool(alive.any())):
            break
        attention = torch.cat([attention, fed[:, None]], dim=1)
        n_real = n_real + fed
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=(n_real - 1).clamp(min=0)[:, None],
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
        logits = out.logits[:, -1]
    response_mask = torch.stack(masks, dim=1).long()
    length = int(response_mask.sum(-1).max())  # drop columns run after every row had ended
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(ids, dim=1)[:, :length],
        response_mask=response_mask[:, :length],
        logprobs=torch.stack(logps, dim=1)[:, :length],
        ended=~alive,
    )


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row from (B, V) logits; return (tokens, their untruncated log-probs)."""
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:
        scaled = scaled / temperature
    # Same formula as token_logprobs (picked logit - logsumexp), so the two agree to float rounding.
    log_z = torch.logsumexp(scaled, dim=-1)
    if temperature == 0:
        token = scaled.argmax(dim=-1)
    else:
        probs = torch.softmax(_filter(scaled, top_k, top_p), dim=-1)
        token = torch.multinomial(probs, num_samples=1).squeeze(-1)
    logp = scaled.gather(-1, token[:, None]).squeeze(-1) - log_z
    return token, logp


def _filter(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf; at least one token always survives."""
    if 0 < top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the first token has 0 before it and always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


# --------------------------------------------------------------------------------------------------
# Scoring


def forward_logprobs(
    model: PreTrainedModel, rollout: Rollout, *, temperature: float = 1.0, chunk_size: int = 128
) -> torch.Tensor:
    """(B, R) log-probs of the response tokens from one forward pass over prompt + response; 0 on padding.

    Uses the rollout's attention mask and position ids, so it matches the sampler's log-probs for the same
    weights and temperature (greedy rollouts: temperature 1.0). Runs under the caller's grad mode and model
    mode: with gradients for the policy loss, under no_grad for old/reference log-probs.
    """
    if temperature <= 0:
        raise ValueError(f"forward_logprobs: temperature must be > 0 (greedy rollouts: 1.0), got {temperature}")
    input_ids = rollout.input_ids
    attention_mask = rollout.attention_mask
    prompt_len, resp_len = rollout.prompt_ids.size(1), rollout.response_ids.size(1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, prompt_len:] = rollout.response_ids.masked_fill(rollout.response_mask == 0, IGNORE)
    # Position P-1 predicts the first response token; only positions P-1 .. P+R-2 are needed. Keep the last
    # R+1 (token_logprobs drops the final one) so the vocabulary projection skips the prompt.
    if _accepts_logits_to_keep(model):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=resp_len + 1,
        ).logits
    else:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).logits[:, prompt_len - 1 :]
    logps, _ = token_logprobs(logits, labels[:, prompt_len - 1 :], temperature=temperature, chunk_size=chunk_size)
    return logps


# --------------------------------------------------------------------------------------------------
# Helpers


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, P) long: prompts left-padded with pad_id to the longest one."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


def concat_rollouts(parts: Sequence[Rollout], *, pad_id: int) -> Rollout:
    """Stack rollouts row-wise: prompts left-padded to the longest P, responses right-padded to the longest R."""
    prompt_len = max(r.prompt_ids.size(1) for r in parts)
    resp_len = max(r.response_ids.size(1) for r in parts)

    def pad(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
        extra = width - x.size(1)
        return F.pad(x, (extra, 0) if left else (0, extra), value=value) if extra else x

    return Rollout(
        prompt_ids=torch.cat([pad(r.prompt_ids, prompt_len, pad_id, True) for r in parts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, prompt_len, 0, True) for r in parts]),
        response_ids=torch.cat([pad(r.response_ids, resp_len, pad_id, False) for r in parts]),
        response_mask=torch.cat([pad(r.response_mask, resp_len, 0, False) for r in parts]),
        logprobs=torch.cat([pad(r.logprobs, resp_len, 0.0, False) for r in parts]),
        ended=torch.cat([r.ended for r in parts]),
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / PEFT wrappers (for its config and forward signature)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False
