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

Two engines sit behind `sample`, with the same `Rollout` contract:
- `engine="dynamic"` (default): the portable engine. Plain eager forwards with a transformers
  `DynamicCache` that grows one column per step (the attention mask grows with it), on any device
  (CPU, CUDA, MPS).
- `engine="static"`: the CUDA fast path. The KV cache is a transformers `StaticCache` of B rows x
  (P + max_new_tokens) columns, allocated at prefill with the model's dtype and device; the attention mask
  is one (B, P + max_new_tokens) buffer, the prompt mask followed by zeros, whose column P+t is set to 1
  for the rows still alive when token t was chosen (transformers sizes the decode mask to the whole static
  cache, so the full-length buffer is passed every step, never a slice). Positions (real tokens seen) and
  the write column live on the device, so every decode step has the same shapes and makes no host sync;
  the only sync is the periodic "every row has ended" check (every `_CHECK_EVERY` steps on accelerators,
  every step on CPU), as in the dynamic engine. A step (one-token forward, temperature / top-k / top-p
  pick, log-prob of the pick, alive/EOS update) is one tensor-only function, `_decode_step`, which
  `compile=True` wraps in `torch.compile(mode="reduce-overhead")` on CUDA (inductor CUDA graphs: one
  graph replay per token) and plain `torch.compile` elsewhere.
  Use it on CUDA as `sample(..., engine="static", compile=True)`. Cost: one compile (and CUDA-graph
  capture) per batch shape (B, P + max_new_tokens) and sampling setting, about 10 s for a 0.5B model on
  an H100. Compiled steps are kept per model, shape and sampling setting (the last 8), and so are the
  static KV caches they write (the last 2 shapes, reset and reused: a CUDA graph is tied to its cache's
  addresses), so repeated rollouts of one shape compile once, while each distinct P compiles again; pad or
  bucket prompt lengths to keep the number of shapes small. Those caches stay allocated between rollouts
  until `clear_static_engine()`. Without compile the static engine is correct on any device but not
  meant to be faster than the dynamic one. Sampling under compile may draw different random numbers
  than eager for the same seed (inductor may generate its own), so seeded runs are reproducible for a
  given setting, not across settings; greedy decoding gives the same tokens.
  Verified on CPU only (transformers 5.23, torch 2.13: greedy tokens equal to the dynamic engine's,
  log-probs equal to `forward_logprobs`, compiled equal to eager); the CUDA-graph path has not been run
  on a GPU yet. The speed estimate comes from a standalone probe of the same design on an H100
  (`StaticCache` + `torch.compile(mode="reduce-overhead")`: 14.2k vs 2.1k new tokens/s eager). Positions
  and the cache column are passed the way each transformers version expects (`cache_position` only
  where the model's forward still takes it).
  Models with sliding-window layers shorter than the static cache are refused.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, StaticCache

from rlhfkit.losses.logprobs import IGNORE, token_logprobs
from rlhfkit.models.wrap import base_model

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
    engine: Literal["dynamic", "static"] = "dynamic",
    compile: bool = False,
) -> Rollout:
    """Complete every prompt and record the sampled tokens' log-probs (see the module doc).

    temperature 0 = greedy (log-probs at temperature 1); top_k 0 and top_p 1.0 = no filtering (filtering
    only chooses the token, the log-prob is the untruncated one). batch_size 0 samples all prompts at
    once, otherwise in chunks of batch_size whose rollouts are concatenated (padded to common P and R).
    engine "dynamic" (growing KV cache, eager) or "static" (preallocated KV cache and mask, fixed-shape
    steps); compile=True (static engine only) runs the decode step under torch.compile, with CUDA graphs
    on CUDA: the fast path on GPUs, at the cost of one compile per batch shape (see the module doc).
    The model is put in eval mode and restored afterwards; tensors come back on the model's device.
    """
    if engine not in ("dynamic", "static"):
        raise ValueError(f"sample: engine must be 'dynamic' or 'static', got {engine!r}")
    if compile and engine != "static":
        raise ValueError("sample: compile=True needs engine='static'")
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
        chunk_fn = _sample_chunk if engine == "dynamic" else _sample_chunk_static
        extra = {"compile": compile} if engine == "static" else {}
        parts = [
            chunk_fn(
                model, prompt_ids[start : start + step], device=device, pad_id=pad_id, eos=eos,
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, **extra,
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
    cache = DynamicCache(config=base_model(model).config)
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


# --------------------------------------------------------------------------------------------------
# Static engine: preallocated KV cache and attention mask, fixed-shape decode steps (CUDA graphs)

# Compiled decode steps and the static caches they write, per model and shape (least recently used last
# out). A compiled step with CUDA graphs bakes in the cache tensors' addresses, so the cache is reused
# (reset, not reallocated) by later rollouts of the same shape; a new cache would force a re-capture.
_COMPILED_STEPS: OrderedDict[tuple, tuple[weakref.ref, Callable]] = OrderedDict()
_STATIC_CACHES: OrderedDict[tuple, tuple[weakref.ref, StaticCache]] = OrderedDict()
_MAX_COMPILED_STEPS = 8
_MAX_STATIC_CACHES = 2


def clear_static_engine() -> None:
    """Drop the compiled decode steps and the static KV caches kept for `engine="static", compile=True`.

    Frees their memory (e.g. before a memory-hungry training phase); the next compiled rollout recompiles.
    """
    _COMPILED_STEPS.clear()
    _STATIC_CACHES.clear()


def _sample_chunk_static(
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
    compile: bool,
) -> Rollout:
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    base = base_model(model)
    keep = _accepts_logits_to_keep(model)
    with_cache_position = _accepts_cache_position(model)
    cache = _static_cache(model, base, batch, total, device, reuse=compile)

    # The whole (B, P + N) mask every call, prompt mask then zeros: transformers sizes the mask to the static
    # cache (get_mask_sizes -> max_cache_len) and would pad a shorter one, changing shapes step to step.
    attention = torch.zeros(batch, total, dtype=prompt_mask.dtype, device=device)
    attention[:, :prompt_len] = prompt_mask
    prefill = {"logits_to_keep": 1} if keep else {}
    if with_cache_position:
        prefill["cache_position"] = torch.arange(prompt_len, device=device)
    out = model(
        input_ids=prompt_ids,
        attention_mask=attention,
        position_ids=position_ids_from_mask(prompt_mask),
        past_key_values=cache,
        use_cache=True,
        **prefill,
    )
    token, logp = _pick(out.logits[:, -1], temperature, top_k, top_p)
    del out

    ids = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    masks = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    ids[:, 0], logps[:, 0], masks[:, 0] = token, logp, 1
    fed = torch.ones(batch, dtype=torch.long, device=device)  # every row was alive when token 0 was chosen
    alive = ~torch.isin(token, eos)
    n_real = prompt_mask.sum(-1)
    column = torch.full((1,), prompt_len, dtype=torch.long, device=device)  # where the next fed token goes

    step_fn = _decode_step
    graphs = False
    if compile:
        key = (id(base), str(device), batch, total, float(temperature), int(top_k), float(top_p), int(pad_id),
               tuple(eos.tolist()), keep, with_cache_position)
        step_fn = _compiled_step(key, base, device)
        graphs = device.type == "cuda"
    check_every = 1 if device.type == "cpu" else _CHECK_EVERY
    for t in range(1, max_new_tokens):
        if t % check_every == 0 and not bool(alive.any()):
            break
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        token, logp, fed, alive, attention, n_real, column = step_fn(
            model, cache, token, fed, alive, attention, n_real, column, eos,
            pad_id, temperature, top_k, top_p, keep, with_cache_position,
        )
        if graphs:
            # CUDA-graph outputs live in memory the next replay overwrites: keep copies of the carried state.
            token, fed, alive, attention, n_real, column = (
                x.clone() for x in (token, fed, alive, attention, n_real, column)
            )
        ids[:, t], logps[:, t], masks[:, t] = token, logp, fed
    length = int(masks.sum(-1).max())  # drop columns run after every row had ended
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=ids[:, :length],
        response_mask=masks[:, :length],
        logprobs=logps[:, :length],
        ended=~alive,
    )


def _decode_step(
    model: torch.nn.Module,
    cache: StaticCache,
    token: torch.Tensor,
    fed: torch.Tensor,
    alive: torch.Tensor,
    attention: torch.Tensor,
    n_real: torch.Tensor,
    column: torch.Tensor,
    eos: torch.Tensor,
    pad_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    keep: bool,
    with_cache_position: bool,
) -> tuple[torch.Tensor, ...]:
    """One fixed-shape decode step of the static engine, tensors only (no host sync), for torch.compile.

    Feeds `token` (B,) (the previous pick; pad_id on rows that had ended) at cache column `column` (1,),
    where `fed` (B,) long is 1 for the rows it is real for (alive when it was chosen). Returns the next
    (token, log-prob, fed, alive) and the updated (attention, n_real, column); the inputs are not mutated
    (only the KV cache is written, in place).
    """
    columns = torch.arange(attention.size(1), device=attention.device)
    attention = torch.where(columns[None, :] == column, fed[:, None], attention)
    n_real = n_real + fed
    kwargs: dict = {"logits_to_keep": 1} if keep else {}
    if with_cache_position:  # transformers < 5.2x: the static cache writes at cache_position
        kwargs["cache_position"] = column
    logits = model(
        input_ids=token[:, None],
        attention_mask=attention,
        position_ids=(n_real - 1).clamp(min=0)[:, None],
        past_key_values=cache,
        use_cache=True,
        **kwargs,
    ).logits[:, -1]
    token, logp = _pick(logits, temperature, top_k, top_p)
    token = torch.where(alive, token, torch.full_like(token, pad_id))
    logp = torch.where(alive, logp, torch.zeros_like(logp))
    fed = alive.long()
    alive = alive & ~torch.isin(token, eos)
    return token, logp, fed, alive, attention, n_real, column + 1


def _static_cache(
    model: torch.nn.Module, base: torch.nn.Module, batch: int, total: int, device: torch.device, *, reuse: bool
) -> StaticCache:
    """A StaticCache of `total` columns for `batch` rows; with reuse, the one kept for this model and shape, reset."""
    dtype = next(model.parameters()).dtype
    key = (id(base), str(device), dtype, batch, total)
    if reuse:
        entry = _STATIC_CACHES.get(key)
        if entry is not None and entry[0]() is base:
            _STATIC_CACHES.move_to_end(key)
            entry[1].reset()
            return entry[1]
    config = base.config
    try:
        cache = StaticCache(config=config, max_cache_len=total)
    except TypeError:  # older transformers signature
        cache = StaticCache(config=config, max_batch_size=batch, max_cache_len=total, device=device, dtype=dtype)
    short = [i for i, layer in enumerate(getattr(cache, "layers", [])) if getattr(layer, "max_cache_len", total) < total]
    if short:
        raise ValueError(
            f"sample(engine='static'): layers {short} keep a sliding window shorter than prompt + max_new_tokens "
            f"({total}); use engine='dynamic' for this model"
        )
    if reuse:
        _STATIC_CACHES[key] = (weakref.ref(base), cache)
        while len(_STATIC_CACHES) > _MAX_STATIC_CACHES:
            _STATIC_CACHES.popitem(last=False)
    return cache


def _compiled_step(key: tuple, base: torch.nn.Module, device: torch.device) -> Callable:
    """`_decode_step` under torch.compile, one per key (model, shape, sampling setting), kept across calls.

    Each entry compiles a fresh copy of the function: dynamo keeps compiled graphs, and counts recompiles
    against `recompile_limit` (8), per code object, so shapes sharing one code object would fall back to
    eager once a run had seen a few of them.
    """
    entry = _COMPILED_STEPS.get(key)
    if entry is not None and entry[0]() is base:
        _COMPILED_STEPS.move_to_end(key)
        return entry[1]
    code = _decode_step.__code__.replace(co_name=f"_decode_step_{len(_COMPILED_STEPS)}_{id(key)}")
    fresh = types.FunctionType(code, _decode_step.__globals__, code.co_name)
    mode = "reduce-overhead" if device.type == "cuda" else None
    step = torch.compile(fresh, mode=mode, dynamic=False)
    _COMPILED_STEPS[key] = (weakref.ref(base), step)
    while len(_COMPILED_STEPS) > _MAX_COMPILED_STEPS:
        _COMPILED_STEPS.popitem(last=False)
    return step


def _accepts_cache_position(model: torch.nn.Module) -> bool:
    try:
        return "cache_position" in inspect.signature(base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


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


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
