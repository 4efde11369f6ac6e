"""Scalar and class heads on a language-model backbone: build, pool, load, and score text with them.

A reward model is `AutoModelForSequenceClassification`: the causal LM's backbone plus a linear `score`
head (hidden -> num_labels, no bias). Its output is read at the LAST NON-PADDING token of each
right-padded row, found from the attention mask, or averaged over the real tokens for a model trained
with `pooling=mean` (`rlhfkit_pooling` in its config). We do not use transformers' own pooling, which looks
for the last token that differs from `pad_token_id`: in the bundled SmolLM2 the pad token *is* the
end-of-turn token, so a sequence ending with it would be scored one token early.
"""

from __future__ import annotations

import math
import sys
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.data.formats import Message, RowProblem, Sample
from rlhfkit.data.tokenize import IGNORE, tokenize_sft
from rlhfkit.errors import DataError, ModelError, RlhfkitError
from rlhfkit.models.load import (
    SPEC_ATTR,
    ModelConfig,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_spec,
)
from rlhfkit.models.wrap import is_peft, unwrap

HEAD = "score"  # the head's attribute name in every *ForSequenceClassification of decoder-only models


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention_mask == 1 in each row: (B, T) -> (B,).

    Works for right padding (the usual case here) and left padding alike. Every row needs at least
    one real token.
    """
    T = attention_mask.size(-1)
    return T - 1 - attention_mask.flip(-1).to(torch.int32).argmax(-1)


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The `score` module of a (DDP-, PEFT-wrapped) sequence-classification model."""
    base = unwrap(model)
    if is_peft(base):
        base = base.get_base_model()
    head = getattr(base, HEAD, None)
    if not isinstance(head, torch.nn.Module):
        raise ModelError(f"{type(base).__name__} has no '{HEAD}' head: expected a *ForSequenceClassification model")
    return head


def freeze_backbone(model: torch.nn.Module) -> None:
    """Transfer fine-tuning: only the head's parameters keep requires_grad."""
    head = {id(p) for p in score_head(model).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)


POOLING = ("last", "mean")
"""How a head's per-token outputs become one score: at the last real token (the usual reward model), or
their mean over every real token. See docs/reward.md for why the demo's reward model uses `mean`."""


def pooling_of(model: torch.nn.Module) -> str:
    """The pooling a reward model was trained with (`rlhfkit_pooling` in its config; `last` when absent)."""
    base = unwrap(model)
    if is_peft(base):
        base = base.get_base_model()
    return getattr(getattr(base, "config", None), "rlhfkit_pooling", None) or "last"


def head_outputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's output at every position, (B, T, num_labels), before any pooling.

    The forward goes through `model` itself (so DDP synchronises gradients and PEFT adapters apply); a
    hook on the head captures its per-position output before transformers pools it.
    """
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured[-1]


def score_sequences(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Pooled head output: (B, T) ids -> (B,) when num_labels == 1, else (B, num_labels).

    Pooling `last` reads the last real token; `mean` averages over the real tokens (the head is linear,
    so this is the head applied to the mean hidden state).
    """
    logits = head_outputs(model, input_ids, attention_mask)  # (B, T, L)
    if pooling_of(model) == "mean":
        logits = logits.float()  # bf16 scores summed in bf16 would blur the small difference between two answers
        m = attention_mask.to(logits.device, logits.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (logits * m).sum(1) / m.sum(1).clamp(min=1)  # (B, L)
    else:
        idx = last_token_index(attention_mask).to(logits.device)  # (B,)
        pooled = logits[torch.arange(logits.size(0), device=logits.device), idx]  # (B, L)
    return pooled.squeeze(-1) if pooled.size(-1) == 1 else pooled


def init_score_head(head: torch.nn.Linear, mode: Literal["normal", "zeros"], seed: int) -> None:
    """Seeded head initialisation, independent of the global RNG.

    normal: N(0, 1/(hidden+1)) as in Ziegler et al. 2019 (lm-human-preferences): initial rewards have
    about unit scale and the backbone receives gradient from the first step. zeros: every score starts at
    0 (only the head moves on step one), the usual choice for value heads.
    """
    with torch.no_grad():
        if mode == "zeros":
            head.weight.zero_()
        else:
            gen = torch.Generator().manual_seed(seed)
            std = 1.0 / math.sqrt(head.in_features + 1)
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
        if head.bias is not None:
            head.bias.zero_()


def build_reward_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_labels: int = 1,
    head_init: Literal["normal", "zeros"] = "normal",
    seed: int = 0,
    device: torch.device | None = None,
    layers: int = 0,
) -> PreTrainedModel:
    """A fresh *ForSequenceClassification from any spec the loader accepts (tiny:, bundled:, folder, ...).

    The causal LM is loaded as usual (safetensors only, dropout off, gradient checkpointing if asked),
    then its backbone module is moved into a classification model built on the meta device (no second
    copy of the weights, no wasted random init), and a new head is created and initialised.
    `layers` > 0 keeps only the first `layers` transformer blocks (the final norm stays): see
    `truncate_layers`.
    """
    causal = load_causal_lm(cfg, device=None, tokenizer=tokenizer)
    if layers:
        truncate_layers(causal, layers, cfg.name)
    config = causal.config
    config.num_labels = num_labels
    config.pad_token_id = tokenizer.pad_token_id  # transformers refuses batches > 1 without one
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        raise ModelError(f"{cfg.name}: transformers has no sequence-classification variant of "
                         f"{type(causal).__name__} ({str(exc).splitlines()[0]})") from None
    prefix = model.base_model_prefix
    setattr(model, prefix, getattr(causal, causal.base_model_prefix))
    weight = next(causal.parameters())
    hidden = config.get_text_config().hidden_size
    setattr(model, HEAD, torch.nn.Linear(hidden, num_labels, bias=False, dtype=weight.dtype, device=weight.device))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelError(f"{cfg.name}: cannot build a reward model from {type(causal).__name__} "
                         f"(weights outside the backbone: {left[:3]})")
    init_score_head(score_head(model), head_init, seed)
    # Same loadable name and spec as the causal LM (PEFT adapters on it name their base from these).
    model.name_or_path = causal.name_or_path
    setattr(model, SPEC_ATTR, getattr(causal, SPEC_ATTR, None))
    disable_dropout(model)  # the backbone's already is; this covers anything the classification class adds
    model.train()
    return model.to(device) if device is not None else model


def truncate_layers(model: PreTrainedModel, layers: int, name: str) -> None:
    """Keep the first `layers` decoder blocks of a causal LM, in place (config.num_hidden_layers follows, so
    the saved model loads back with that depth). A judge of word choice (a lexicon such as VADER) is read
    better from early layers than from the last ones, which specialise in predicting the next token; and
    a shallow backbone trains several times faster. See docs/reward.md."""
    backbone = getattr(model, model.base_model_prefix, None)
    blocks = getattr(backbone, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ModelError(f"{name}: cannot keep only some layers of {type(model).__name__} (no decoder layer list)")
    if not 0 < layers <= len(blocks):
        raise ModelError(f"{name} has {len(blocks)} layers; backbone_layers must be 1..{len(blocks)}, got {layers}")
    backbone.layers = blocks[:layers]
    text = model.config.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:layers]


def load_reward_model(
    spec: str, device: str | torch.device = "auto", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A trained reward model (folder written by `rlhfkit reward`, or any *ForSequenceClassification
    folder / hub id) and its tokenizer, in eval mode on `device`, with dropout off (disable_dropout)."""
    resolved = resolve_spec(spec)
    if resolved.kind not in ("folder", "hub"):
        raise ModelError(f"'{spec}' is not a reward model: expected the model/ folder of an `rlhfkit reward` run "
                         "(or another Hugging Face *ForSequenceClassification folder)")
    try:
        config = AutoConfig.from_pretrained(resolved.target, trust_remote_code=trust_remote_code)
        archs = getattr(config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ModelError(f"'{spec}' holds {', '.join(archs) or 'an unknown architecture'}, not a reward model "
                             "(*ForSequenceClassification); train one with `rlhfkit reward`")
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved.target, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise ModelError(f"could not load reward model '{spec}': {str(exc).splitlines()[0][:300]}") from None
    tokenizer = load_tokenizer(spec, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)  # callers may train it (PPO's critic): forwards must stay deterministic
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Inputs and scoring


def _fit(ids: list[int], start: int, max_length: int, truncation: str, what: str, setting: str) -> list[int]:
    """Apply max_length; `start` is where the scored part (response) begins. truncation: "error", "right"
    (keep the beginning; the prompt must fit) or "left" (keep the end, where a reward model reads its
    score; the beginning of the prompt is dropped)."""
    if len(ids) <= max_length:
        return ids
    if truncation == "left":
        return ids[-max_length:]
    if truncation == "error":
        raise RowProblem(f"{what} is longer than {setting} after tokenization ({len(ids)} > {max_length} tokens)")
    if start >= max_length:
        raise RowProblem(f"prompt is longer than {setting} after tokenization ({start} >= {max_length} tokens), "
                         "so no response token would be scored")
    return ids[:max_length]


def encode_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message], response: str | list[Message], *,
    max_length: int, chat_template: str = "auto", truncation: str = "error", what: str = "prompt + response",
    setting: str = "data.max_length",
) -> list[int]:
    """Token ids of prompt + response as the policy sees them (chat template, end-of-turn token)."""
    ids, start = _encode_whole(tokenizer, prompt, response, chat_template)
    return _fit(ids, start, max_length, truncation, what, setting)


def _encode_whole(tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message], response: str | list[Message],
                  chat_template: str) -> tuple[list[int], int]:
    """Untruncated token ids of prompt + response, and the index of the first response token."""
    if isinstance(prompt, list) and isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    elif isinstance(response, list) and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    ex = tokenize_sft(Sample("", prompt=prompt, completion=response), tokenizer, max_length=sys.maxsize,
                      chat_template=chat_template)
    return ex.input_ids, next(i for i, t in enumerate(ex.labels) if t != IGNORE)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, *, max_length: int, truncation: str = "error") -> list[int]:
    """Token ids of a plain text (classification) followed by EOS, with no chat template."""
    ex = tokenize_sft(Sample("", text=text), tokenizer, max_length=sys.maxsize)
    return _fit(ex.input_ids, 0, max_length, truncation, "text", "data.max_length")


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: input_ids and attention_mask, (N, T)."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def score_ids(model: PreTrainedModel, seqs: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """Raw head outputs (B,) for token sequences, batched longest first to limit padding."""
    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = pad_right([seqs[i] for i in idx], pad_id)
        scores = score_sequences(model, input_ids.to(device), attention_mask.to(device)).float()
        for i, value in zip(idx, scores.tolist()):
            out[i] = value
    return out


def to_reward_units(model: PreTrainedModel, raw: list[float], normalize: bool = False) -> list[float]:
    """De-normalize regression predictions; optionally z-score with the saved training reward stats."""
    config = model.config
    if getattr(config, "rlhfkit_target_mean", None) is not None:
        raw = [r * config.rlhfkit_target_std + config.rlhfkit_target_mean for r in raw]
    if normalize:
        mean, std = getattr(config, "rlhfkit_reward_mean", None), getattr(config, "rlhfkit_reward_std", None)
        if mean is None or std is None:
            raise RlhfkitError("normalize=True needs rlhfkit_reward_mean/std in the model's config.json "
                               "(written by `rlhfkit reward`)")
        raw = [(r - mean) / max(std, 1e-8) for r in raw]
    return raw


def check_scalar(model: PreTrainedModel) -> None:
    if model.config.num_labels != 1:
        raise RlhfkitError(f"this model has {model.config.num_labels} outputs (a classifier); scoring needs a "
                           "scalar reward model (mode=pairwise or regression)")


def score_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[Message]],
    responses: list[str], *, batch_size: int = 8, max_length: int = 1024, chat_template: str | None = None,
    normalize: bool = False, truncation: str = "error", stats: dict[str, int] | None = None,
) -> list[float]:
    """Rewards for (prompt, response) pairs, rendered as in training (the model's saved chat_template
    mode unless given). Regression models answer in the original target units; `normalize=True` maps
    scores to (r - mean) / std of the training rewards. Inputs longer than `max_length` are an error, or
    with truncation="left" lose the beginning (counted in `stats["truncated"]` when given). Call with the
    model in eval mode."""
    check_scalar(model)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    template = chat_template or getattr(model.config, "rlhfkit_chat_template", "auto")
    seqs = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, start = _encode_whole(tokenizer, prompt, response, template)
        if stats is not None and len(ids) > max_length:
            stats["truncated"] = stats.get("truncated", 0) + 1
        try:
            seqs.append(_fit(ids, start, max_length, truncation, "prompt + response", "max_length"))
        except RowProblem as exc:
            raise DataError(f"item {i}: {exc}", [f"item {i}: {exc}"]) from None
    return to_reward_units(model, score_ids(model, seqs, tokenizer.pad_token_id, batch_size), normalize)
