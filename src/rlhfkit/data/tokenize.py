"""Samples -> token ids and labels: chat templates, completion-only labels, truncation.

Labels are -100 wherever no loss is taken. With a chat template, the conversation is rendered
incrementally: the text before each trained assistant turn (ending with the generation prompt, e.g.
`<|im_start|>assistant\\n`) is context, the turn itself (content plus the end-of-turn token) is trained.
Without a template, prompt and completion are concatenated, after the special tokens the tokenizer
itself puts first (BOS), and an EOS token ends the completion so the model learns to stop.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhfkit.data.formats import Message, RowProblem, Sample

IGNORE = -100


@dataclass
class TokenizedExample:
    where: str
    input_ids: list[int]
    labels: list[int]

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_template(tokenizer: PreTrainedTokenizerBase, mode: str) -> bool:
    """`mode` is auto (template if the tokenizer has one), always, or never."""
    if mode == "never":
        return False
    if mode == "always" and not has_chat_template(tokenizer):
        raise RowProblem("data.chat_template=always but the tokenizer has no chat template")
    return has_chat_template(tokenizer)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


_PREFIXES: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, list[int]] = weakref.WeakKeyDictionary()


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer itself puts before a text (usually just BOS), found once per tokenizer.

    Measured rather than read from `add_bos_token`: in transformers 5 that attribute comes only from
    tokenizer_config.json, while e.g. Llama 3 adds BOS in its tokenizer.json post-processor and leaves the
    attribute unset. Only the prefix is taken; the EOS ending a completion is added separately.
    """
    if tokenizer not in _PREFIXES:
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        _PREFIXES[tokenizer] = list(full[:start])
    return list(_PREFIXES[tokenizer])


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def as_messages(sample: Sample) -> tuple[list[Message], int]:
    """The conversation and the index of the first message that may be trained."""
    if sample.messages is not None:
        return sample.messages, 0
    prompt, completion = sample.prompt, sample.completion
    if isinstance(prompt, list):
        return prompt + completion, len(prompt)  # type: ignore[operator]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], 1  # type: ignore[list-item]


def _chat_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message], first_trained: int) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) spans."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[str, bool]] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < first_trained:
            continue
        if i == 0:
            raise RowProblem("the conversation starts with an assistant message; nothing precedes it to condition on")
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) >= pos):
            raise RowProblem(
                "the model's chat template does not render this conversation incrementally, so assistant turns "
                "cannot be located; set data.completion_only_loss=false"
            )
        spans.append((full[pos : len(before)], False))
        spans.append((full[len(before) : len(through)], True))
        pos = len(through)
    spans.append((full[pos:], False))
    return [s for s in spans if s[0]]


def tokenize_sft(
    sample: Sample,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    chat_template: str = "auto",
    completion_only_loss: bool = True,
    truncation: str = "right",
) -> TokenizedExample:
    """Tokenize one SFT sample. Raises RowProblem when it cannot be trained on."""
    if sample.text is not None:
        ids = special_prefix(tokenizer) + _encode(tokenizer, sample.text) + [tokenizer.eos_token_id]
        spans_ids = [(ids, True)]
    elif use_template(tokenizer, chat_template):
        messages, first = as_messages(sample)
        if completion_only_loss:
            spans = _chat_spans(tokenizer, messages, first)
        else:  # every token is trained: no need to locate turns
            spans = [(render(tokenizer, messages, add_generation_prompt=False), True)]
        # No special_prefix here: the template writes BOS itself when the model wants one (`{{ bos_token }}`),
        # and transformers' apply_chat_template(tokenize=True) encodes without special tokens too.
        spans_ids = [(_encode(tokenizer, text), trained) for text, trained in spans]
    else:
        if isinstance(sample.prompt, list) or sample.messages is not None:
            raise RowProblem("chat messages need a chat template, but the tokenizer has none (or data.chat_template=never)")
        prompt_ids = special_prefix(tokenizer) + _encode(tokenizer, sample.prompt or "")
        spans_ids = [(prompt_ids, False), (_encode(tokenizer, sample.completion or "") + [tokenizer.eos_token_id], True)]

    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in spans_ids:
        input_ids.extend(ids)
        labels.extend(ids if (trained or not completion_only_loss) else [IGNORE] * len(ids))
    if labels:
        labels[0] = IGNORE  # the first token is never predicted (nothing precedes it)
    if len(input_ids) > max_length:
        first_label = next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))
        if truncation == "error":
            raise RowProblem(f"longer than data.max_length after tokenization ({len(input_ids)} > {max_length} tokens)")
        if first_label >= max_length:
            raise RowProblem(
                f"prompt is longer than data.max_length after tokenization ({first_label} >= {max_length} tokens), "
                "so no completion token would be trained"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not any(t != IGNORE for t in labels):
        raise RowProblem("no tokens to train on after tokenization (empty completion?)")
    return TokenizedExample(sample.where, input_ids, labels)


def tokenize_prompt(sample: Sample, tokenizer: PreTrainedTokenizerBase, chat_template: str = "auto") -> list[int]:
    """Prompt ids ready for generation (with the generation prompt when a chat template is used)."""
    prompt = sample.prompt
    if use_template(tokenizer, chat_template):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return _encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))
    if isinstance(prompt, list):
        raise RowProblem("chat messages need a chat template, but the tokenizer has none (or data.chat_template=never)")
    return special_prefix(tokenizer) + _encode(tokenizer, prompt or "")


@dataclass
class PairExample:
    """A tokenized preference pair: both responses after the same prompt, loss labels on responses."""

    where: str
    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float | None = None

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def tokenize_preference(
    sample: Sample,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    chat_template: str = "auto",
    truncation: str = "right",
) -> PairExample:
    """Tokenize prompt+chosen and prompt+rejected exactly as SFT would (labels on the response only)."""
    from dataclasses import replace

    def one(response: object, name: str) -> TokenizedExample:
        try:
            return tokenize_sft(replace(sample, completion=response, chosen=None, rejected=None), tokenizer,
                                max_length=max_length, chat_template=chat_template, truncation=truncation)
        except RowProblem as exc:
            raise RowProblem(f"{name}: {exc}") from None

    if isinstance(sample.prompt, list) != isinstance(sample.chosen, list):
        raise RowProblem("fields 'prompt' and 'chosen' must both be strings or both be message lists")
    return PairExample(sample.where, one(sample.chosen, "chosen"), one(sample.rejected, "rejected"), sample.margin)
