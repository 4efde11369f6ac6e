"""rlhfkit.data.tokenize: chat templates, completion-only labels, truncation (bundled SmolLM2 tokenizer)."""

from __future__ import annotations

import pytest

from rlhfkit.data.formats import RowProblem, Sample
from rlhfkit.data.tokenize import IGNORE, as_messages, tokenize_prompt, tokenize_sft

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def trained_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t in ex.labels if t != IGNORE])


def test_template_renders_as_expected(tokenizer):
    # The label checks below rely on this exact rendering (default system prompt, <|im_end|> + newline).
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text == SYSTEM_DEFAULT + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_prompt_completion_labels_only_the_completion(tokenizer):
    ex = tokenize_sft(Sample("f:1", prompt="What is 2+2?", completion="It is 4."), tokenizer, max_length=512)
    assert ex.where == "f:1"
    assert len(ex.input_ids) == len(ex.labels)
    assert tokenizer.decode(ex.input_ids) == (
        SYSTEM_DEFAULT + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )
    assert trained_text(tokenizer, ex) == "It is 4.<|im_end|>\n"
    # Labels are a contiguous tail that equals the input ids there; everything before is -100.
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert all(t == IGNORE for t in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]
    assert tokenizer.decode(ex.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert ex.num_loss_tokens == len(ex.input_ids) - first


def test_multi_turn_trains_every_assistant_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ex = tokenize_sft(Sample("f:1", messages=messages), tokenizer, max_length=512)
    assert tokenizer.decode(ex.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye.<|im_end|>\n"
    )
    # Split the labels into maximal runs of trained tokens: exactly the two assistant turns.
    runs, cur = [], []
    for tok_id, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE:
            assert lab == tok_id
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tokenizer.decode(r) for r in runs] == ["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]


def test_message_list_prompt_completion_trains_only_the_completion_turns(tokenizer):
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Earlier answer."},
        {"role": "user", "content": "Again"},
    ]
    completion = [{"role": "assistant", "content": "Now."}]
    assert as_messages(Sample("f", prompt=prompt, completion=completion)) == (prompt + completion, 3)
    ex = tokenize_sft(Sample("f:1", prompt=prompt, completion=completion), tokenizer, max_length=512)
    assert trained_text(tokenizer, ex) == "Now.<|im_end|>\n"


def test_conversation_starting_with_assistant(tokenizer):
    messages = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]
    with pytest.raises(RowProblem) as info:
        tokenize_sft(Sample("f:1", messages=messages), tokenizer, max_length=512)
    assert str(info.value) == (
        "the conversation starts with an assistant message; nothing precedes it to condition on"
    )


def test_completion_only_loss_false_trains_every_token_but_the_first(tokenizer):
    ex = tokenize_sft(
        Sample("f:1", prompt="What is 2+2?", completion="It is 4."), tokenizer, max_length=512,
        completion_only_loss=False,
    )
    assert ex.labels[0] == IGNORE
    assert ex.labels[1:] == ex.input_ids[1:]
    with_mask = tokenize_sft(Sample("f:1", prompt="What is 2+2?", completion="It is 4."), tokenizer, max_length=512)
    assert ex.input_ids == with_mask.input_ids


def test_no_template_prompt_completion_eos(tokenizer):
    ex = tokenize_sft(
        Sample("f:1", prompt="Q: hi", completion=" A: yo"), tokenizer, max_length=512, chat_template="never"
    )
    prompt_ids = tokenizer("Q: hi", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(" A: yo", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert ex.labels == [IGNORE] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
    assert ex.labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert trained_text(tokenizer, ex) == " A: yo" + tokenizer.eos_token


def test_no_template_rejects_messages(tokenizer):
    with pytest.raises(RowProblem) as info:
        tokenize_sft(
            Sample("f:1", messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
            tokenizer, max_length=512, chat_template="never",
        )
    assert str(info.value) == (
        "chat messages need a chat template, but the tokenizer has none (or data.chat_template=never)"
    )


def test_text_rows_train_on_all_tokens(tokenizer):
    ex = tokenize_sft(Sample("f:1", text="hello world, this is plain text"), tokenizer, max_length=512)
    assert ex.input_ids == tokenizer("hello world, this is plain text", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert ex.labels[0] == IGNORE  # nothing precedes the first token
    assert ex.labels[1:] == ex.input_ids[1:]


def test_right_truncation_cuts_a_long_completion(tokenizer):
    sample = Sample("f:1", prompt="Hi", completion="word " * 200)
    full = tokenize_sft(sample, tokenizer, max_length=10_000)
    ex = tokenize_sft(sample, tokenizer, max_length=64, truncation="right")
    assert len(full.input_ids) > 64
    assert len(ex.input_ids) == len(ex.labels) == 64
    assert ex.input_ids == full.input_ids[:64]
    assert ex.labels == full.labels[:64]
    assert ex.num_loss_tokens > 0


def test_prompt_longer_than_max_length(tokenizer):
    sample = Sample("f:1", prompt="word " * 100, completion="x")
    first_label = next(i for i, t in enumerate(tokenize_sft(sample, tokenizer, max_length=10_000).labels) if t != IGNORE)
    with pytest.raises(RowProblem) as info:
        tokenize_sft(sample, tokenizer, max_length=20)
    assert str(info.value) == (
        f"prompt is longer than data.max_length after tokenization ({first_label} >= 20 tokens), "
        "so no completion token would be trained"
    )


def test_truncation_error_for_an_over_long_row(tokenizer):
    sample = Sample("f:1", prompt="Hi", completion="word " * 100)
    n = len(tokenize_sft(sample, tokenizer, max_length=10_000).input_ids)
    with pytest.raises(RowProblem) as info:
        tokenize_sft(sample, tokenizer, max_length=20, truncation="error")
    assert str(info.value) == f"longer than data.max_length after tokenization ({n} > 20 tokens)"
    # exactly at the limit is fine
    assert len(tokenize_sft(sample, tokenizer, max_length=n, truncation="error").input_ids) == n


def test_tokenize_prompt_ends_with_generation_prompt(tokenizer):
    ids = tokenize_prompt(Sample("f:1", prompt="Hi"), tokenizer)
    assert tokenizer.decode(ids) == SYSTEM_DEFAULT + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenize_prompt(Sample("f:1", prompt="Hi"), tokenizer, chat_template="never") == tokenizer(
        "Hi", add_special_tokens=False
    )["input_ids"]


# --------------------------------------------------------------------------------------------------
# BOS added by the tokenizer's post-processor (Llama 3 style)

BOS = "<|endoftext|>"
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def bos_folder(tmp_path_factory):
    """The bundled tokenizer made Llama-3-like: tokenizer.json's post-processor puts BOS first and
    tokenizer_config.json says nothing about add_bos_token, so transformers 5 reports it False."""
    import json
    import shutil

    from tokenizers import Tokenizer, processors

    from rlhfkit.models.bundled import prepare_bundled_tokenizer

    folder = tmp_path_factory.mktemp("bos_tokenizer")
    shutil.copytree(prepare_bundled_tokenizer(), folder, dirs_exist_ok=True)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    backend.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "add_bos_token" not in config
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": BOS}))
    return folder


def load_bos_tokenizer(folder, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = chat_template
    return tok


def test_bos_from_the_post_processor_is_put_first_without_a_template(bos_folder):
    tok = load_bos_tokenizer(bos_folder)
    bos_id = tok.convert_tokens_to_ids(BOS)
    assert not getattr(tok, "add_bos_token", False)  # the attribute the old check trusted
    assert tok("Q: hi")["input_ids"] == [bos_id] + tok("Q: hi", add_special_tokens=False)["input_ids"]

    prompt_ids = tok("Q: hi", add_special_tokens=False)["input_ids"]
    completion_ids = tok(" A: yo", add_special_tokens=False)["input_ids"]
    ex = tokenize_sft(Sample("f:1", prompt="Q: hi", completion=" A: yo"), tok, max_length=512)
    assert ex.input_ids == [bos_id] + prompt_ids + completion_ids + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * (1 + len(prompt_ids)) + completion_ids + [tok.eos_token_id]

    text = tokenize_sft(Sample("f:1", text="plain text"), tok, max_length=512)
    assert text.input_ids == [bos_id] + tok("plain text", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert text.labels[0] == IGNORE and text.labels[1:] == text.input_ids[1:]

    # the prompt a policy generates from is exactly what the tokenizer makes of it
    assert tokenize_prompt(Sample("f:1", prompt="Hi"), tok) == tok("Hi")["input_ids"]


def test_a_template_that_renders_bos_gets_it_once(bos_folder):
    tok = load_bos_tokenizer(bos_folder, BOS_TEMPLATE)
    bos_id = tok.convert_tokens_to_ids(BOS)
    ex = tokenize_sft(Sample("f:1", prompt="Hi", completion="Yo"), tok, max_length=512)
    assert tok.decode(ex.input_ids) == BOS + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    assert ex.input_ids.count(bos_id) == 1
    assert trained_text(tok, ex) == "Yo<|im_end|>\n"
    ids = tokenize_prompt(Sample("f:1", prompt="Hi"), tok)
    assert ids[0] == bos_id and ids.count(bos_id) == 1


def test_a_tokenizer_without_bos_gets_none(tokenizer):
    from rlhfkit.data.tokenize import special_prefix

    assert special_prefix(tokenizer) == []
    assert tokenize_prompt(Sample("f:1", prompt="Hi"), tokenizer, chat_template="never") == tokenizer("Hi")["input_ids"]
