"""rlhfkit.data.formats (row schemas, `enforce`) and rlhfkit.data.prepare (`load_examples`,
`split_holdout`): every problem is reported as `where: message`."""

from __future__ import annotations

import pytest

from rlhfkit.data.formats import RowProblem, Sample, enforce, validate_rows
from rlhfkit.data.prepare import load_examples, split_holdout
from rlhfkit.data.sources import Row
from rlhfkit.errors import DataError
from tests.conftest import write_jsonl

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def check(kind: str, data: dict) -> Sample:
    """Validate one row that must be good."""
    samples, problems = validate_rows([Row("f.jsonl:1", data=data)], kind)  # type: ignore[arg-type]
    assert problems == []
    return samples[0]


def problem(kind: str, data: dict) -> str:
    """Validate one row that must be bad; return its problem line."""
    samples, problems = validate_rows([Row("f.jsonl:7", data=data)], kind)  # type: ignore[arg-type]
    assert samples == []
    assert len(problems) == 1
    return problems[0]


# --------------------------------------------------------------------------------------------------
# sft


def test_sft_prompt_completion():
    s = check("sft", {"prompt": "q", "completion": "a", "extra": 1})
    assert s == Sample("f.jsonl:1", prompt="q", completion="a")


def test_sft_prompt_completion_as_message_lists():
    s = check("sft", {"prompt": [USER], "completion": [ASSISTANT]})
    assert s.prompt == [USER] and s.completion == [ASSISTANT]


def test_sft_messages():
    system = {"role": "system", "content": ""}  # an empty system message is allowed
    s = check("sft", {"messages": [system, USER, ASSISTANT]})
    assert s == Sample("f.jsonl:1", messages=[system, USER, ASSISTANT])


def test_sft_messages_extra_keys_are_dropped():
    s = check("sft", {"messages": [{**USER, "name": "x"}, ASSISTANT]})
    assert s.messages == [USER, ASSISTANT]


def test_sft_text():
    assert check("sft", {"text": "hello"}) == Sample("f.jsonl:1", text="hello")


def test_sft_completion_missing():
    assert problem("sft", {"prompt": "q"}) == "f.jsonl:7: field 'completion' is missing"


def test_sft_prompt_missing():
    assert problem("sft", {"completion": "a"}) == "f.jsonl:7: field 'prompt' is missing"


def test_sft_field_null_is_not_called_missing():
    # The key is there with no value: the fix is to fill it in, not to add the field.
    assert problem("sft", {"prompt": None, "completion": "a"}) == (
        "f.jsonl:7: field 'prompt' is null; expected a string or a list of messages"
    )


def test_sft_field_empty():
    assert problem("sft", {"prompt": "q", "completion": "  \n"}) == "f.jsonl:7: field 'completion' is empty"


def test_sft_field_number():
    assert problem("sft", {"prompt": 3, "completion": "a"}) == (
        "f.jsonl:7: field 'prompt' has the wrong type: expected a string or a list of messages, got a number"
    )


def test_sft_text_must_be_a_string():
    assert problem("sft", {"text": [USER]}) == (
        "f.jsonl:7: field 'text' has the wrong type: expected a string, got a list"
    )


def test_sft_text_null():
    assert problem("sft", {"text": None}) == "f.jsonl:7: field 'text' is null; expected a string"


def test_sft_messages_null():
    assert problem("sft", {"messages": None}) == "f.jsonl:7: field 'messages' is null; expected a list of messages"


def test_messages_null_role_and_content():
    assert problem("sft", {"messages": [{"role": None, "content": "hi"}, ASSISTANT]}) == (
        "f.jsonl:7: field 'messages' message 0: 'role' is null"
    )
    assert problem("sft", {"messages": [USER, {"role": "assistant", "content": None}]}) == (
        "f.jsonl:7: field 'messages' message 1: 'content' is null; expected a string"
    )


def test_sft_no_known_fields():
    assert problem("sft", {"question": "q", "answer": "a"}) == (
        "f.jsonl:7: expected fields 'prompt' and 'completion', or 'messages', or 'text'; found 'question', 'answer'"
    )


def test_sft_empty_object():
    assert problem("sft", {}) == (
        "f.jsonl:7: expected fields 'prompt' and 'completion', or 'messages', or 'text'; found none"
    )


def test_sft_prompt_string_completion_messages_mismatch():
    assert problem("sft", {"prompt": "q", "completion": [ASSISTANT]}) == (
        "f.jsonl:7: fields 'prompt' and 'completion' must both be strings or both be message lists"
    )


def test_messages_bad_role():
    assert problem("sft", {"messages": [{"role": "human", "content": "hi"}, ASSISTANT]}) == (
        "f.jsonl:7: field 'messages' message 0: 'role' must be one of system, user, assistant, tool, got 'human'"
    )


def test_messages_missing_role():
    assert problem("sft", {"messages": [USER, {"content": "x"}]}) == (
        "f.jsonl:7: field 'messages' message 1: 'role' is missing"
    )


def test_messages_missing_content():
    assert problem("sft", {"messages": [USER, {"role": "assistant"}]}) == (
        "f.jsonl:7: field 'messages' message 1: 'content' is missing"
    )


def test_messages_content_wrong_type():
    assert problem("sft", {"messages": [USER, {"role": "assistant", "content": 5}]}) == (
        "f.jsonl:7: field 'messages' message 1: 'content' has the wrong type: expected a string, got a number"
    )


def test_messages_empty_content():
    assert problem("sft", {"messages": [{"role": "user", "content": " "}, ASSISTANT]}) == (
        "f.jsonl:7: field 'messages' message 0: 'content' is empty"
    )


def test_messages_item_not_an_object():
    assert problem("sft", {"messages": ["hi", ASSISTANT]}) == (
        "f.jsonl:7: field 'messages' message 0: expected an object with 'role' and 'content', got a string"
    )


def test_messages_not_a_list():
    assert problem("sft", {"messages": "hi"}) == (
        "f.jsonl:7: field 'messages' has the wrong type: expected a list of messages, got a string"
    )


def test_messages_empty_list():
    assert problem("sft", {"messages": []}) == "f.jsonl:7: field 'messages' is empty"


def test_messages_without_assistant_turn():
    assert problem("sft", {"messages": [{"role": "system", "content": "s"}, USER]}) == (
        "f.jsonl:7: field 'messages' has no assistant message to learn from"
    )


def test_row_with_parse_error_is_reported_as_is():
    rows = [Row("f.jsonl:1", data={"text": "ok"}), Row("f.jsonl:2", error="not valid JSON: Expecting value (column 1)")]
    samples, problems = validate_rows(rows, "sft")
    assert [s.where for s in samples] == ["f.jsonl:1"]
    assert problems == ["f.jsonl:2: not valid JSON: Expecting value (column 1)"]


def test_validate_rows_reports_every_bad_row_in_order():
    rows = [
        Row("f:1", data={"prompt": "q"}),
        Row("f:2", data={"text": "ok"}),
        Row("f:3", data={"text": ""}),
        Row("f:4", error="not valid UTF-8"),
    ]
    samples, problems = validate_rows(rows, "sft")
    assert [s.where for s in samples] == ["f:2"]
    assert problems == ["f:1: field 'completion' is missing", "f:3: field 'text' is empty", "f:4: not valid UTF-8"]


# --------------------------------------------------------------------------------------------------
# preference


def test_preference_ok_with_margin():
    s = check("preference", {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2})
    assert s == Sample("f.jsonl:1", prompt="q", chosen="good", rejected="bad", margin=2.0)


def test_preference_margin_optional():
    assert check("preference", {"prompt": "q", "chosen": "good", "rejected": "bad"}).margin is None


def test_preference_missing_chosen():
    assert problem("preference", {"prompt": "q", "rejected": "bad"}) == "f.jsonl:7: field 'chosen' is missing"


def test_preference_null_chosen():
    assert problem("preference", {"prompt": "q", "chosen": None, "rejected": "bad"}) == (
        "f.jsonl:7: field 'chosen' is null; expected a string or a list of messages"
    )


def test_preference_null_margin_is_no_margin():
    assert check("preference", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": None}).margin is None


def test_preference_chosen_identical_to_rejected():
    assert problem("preference", {"prompt": "q", "chosen": "same", "rejected": "same"}) == (
        "f.jsonl:7: field 'chosen' is identical to 'rejected' (a preference needs two different answers)"
    )


def test_preference_identical_message_lists():
    assert problem("preference", {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [dict(ASSISTANT)]}) == (
        "f.jsonl:7: field 'chosen' is identical to 'rejected' (a preference needs two different answers)"
    )


def test_preference_string_vs_message_list():
    assert problem("preference", {"prompt": "q", "chosen": "good", "rejected": [ASSISTANT]}) == (
        "f.jsonl:7: fields 'chosen' and 'rejected' must both be strings or both be message lists"
    )


@pytest.mark.parametrize(
    ("margin", "got"),
    [("abc", "'abc'"), ([1], "a list"), (True, "a boolean")],
)
def test_preference_margin_not_a_number(margin, got):
    assert problem("preference", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": margin}) == (
        f"f.jsonl:7: field 'margin' has the wrong type: expected a number, got {got}"
    )


def test_preference_margin_from_csv_text():
    assert check("preference", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "0.5"}).margin == 0.5


# --------------------------------------------------------------------------------------------------
# rating and prompt


def test_rating_ok():
    s = check("rating", {"prompt": "q", "response": "r", "score": 4})
    assert s == Sample("f.jsonl:1", prompt="q", response="r", score=4.0)


def test_rating_score_as_csv_text():
    assert check("rating", {"prompt": "q", "response": "r", "score": "3.5"}).score == 3.5


def test_rating_score_text_not_a_number():
    assert problem("rating", {"prompt": "q", "response": "r", "score": "abc"}) == (
        "f.jsonl:7: field 'score' has the wrong type: expected a number, got 'abc'"
    )


@pytest.mark.parametrize("score", ["", "  "])
def test_rating_score_missing(score):
    # An empty CSV cell is how CSV leaves a value out.
    assert problem("rating", {"prompt": "q", "response": "r", "score": score}) == (
        "f.jsonl:7: field 'score' is missing"
    )
    assert problem("rating", {"prompt": "q", "response": "r"}) == "f.jsonl:7: field 'score' is missing"


def test_rating_score_null():
    assert problem("rating", {"prompt": "q", "response": "r", "score": None}) == (
        "f.jsonl:7: field 'score' is null; expected a number"
    )


def test_classification_label_null():
    assert problem("classification", {"text": "t", "label": None}) == (
        "f.jsonl:7: field 'label' is null; expected an integer >= 0"
    )


def test_rating_score_not_finite():
    assert problem("rating", {"prompt": "q", "response": "r", "score": "nan"}) == (
        "f.jsonl:7: field 'score' must be a finite number, got nan"
    )


def test_rating_response_must_be_a_string():
    assert problem("rating", {"prompt": "q", "response": [ASSISTANT], "score": 1}) == (
        "f.jsonl:7: field 'response' has the wrong type: expected a string, got a list"
    )


def test_prompt_format():
    assert check("prompt", {"prompt": "q", "completion": "ignored"}) == Sample("f.jsonl:1", prompt="q")
    assert check("prompt", {"prompt": [USER]}).prompt == [USER]
    assert problem("prompt", {"text": "q"}) == "f.jsonl:7: field 'prompt' is missing"
    assert problem("prompt", {"prompt": ""}) == "f.jsonl:7: field 'prompt' is empty"
    assert problem("prompt", {"prompt": {"a": 1}}) == (
        "f.jsonl:7: field 'prompt' has the wrong type: expected a string or a list of messages, got an object"
    )


# --------------------------------------------------------------------------------------------------
# enforce


def test_enforce_no_problems():
    assert enforce([], on_error="error", total=3) == []
    assert enforce([], on_error="skip", total=3) == []


def test_enforce_error_lists_problems_and_suggests_skip():
    probs = ["f:1: field 'prompt' is missing", "f:3: field 'text' is empty"]
    with pytest.raises(DataError) as info:
        enforce(probs, on_error="error", total=5, what="train.jsonl")
    assert str(info.value) == (
        "2 invalid row(s) in train.jsonl:\n"
        "  f:1: field 'prompt' is missing\n"
        "  f:3: field 'text' is empty\n"
        "Fix them, or set data.on_error=skip to train on the valid rows only (nothing was written)."
    )
    assert info.value.problems == probs


def test_enforce_error_caps_the_list():
    probs = [f"f:{i}: bad" for i in range(1, 8)]
    with pytest.raises(DataError) as info:
        enforce(probs, on_error="error", total=10, max_shown=3)
    assert str(info.value) == (
        "7 invalid row(s) in data:\n"
        "  f:1: bad\n  f:2: bad\n  f:3: bad\n"
        "  ... and 4 more\n"
        "Fix them, or set data.on_error=skip to train on the valid rows only (nothing was written)."
    )
    assert info.value.problems == probs  # the full list stays available


def test_enforce_skip_returns_problems():
    probs = ["f:1: bad", "f:2: bad"]
    assert enforce(probs, on_error="skip", total=3) == probs


def test_enforce_skip_with_every_row_bad_still_raises():
    probs = ["f:1: bad", "f:2: bad", "f:3: bad"]
    with pytest.raises(DataError) as info:
        enforce(probs, on_error="skip", total=3, max_shown=2, what="d.jsonl")
    assert str(info.value) == "every row of d.jsonl is invalid (3 rows):\n  f:1: bad\n  f:2: bad\n  ... and 1 more"
    assert info.value.problems == probs


# --------------------------------------------------------------------------------------------------
# load_examples


def _upper(sample: Sample) -> str:
    if sample.completion == "too long":
        raise RowProblem("prompt is longer than data.max_length")
    return sample.completion.upper()  # type: ignore[union-attr]


def test_load_examples_applies_transform(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "b"}])
    assert load_examples(str(path), "sft", _upper) == (["A", "B"], [])


def test_load_examples_collects_schema_and_transform_problems_in_file_order(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "q", "completion": "too long"},  # 1: transform problem
            {"prompt": "q", "completion": "ok"},  # 2
            {"prompt": "q"},  # 3: schema problem
            "oops",  # 4: parse problem
            {"prompt": "q", "completion": "too long"},  # 5: transform problem
        ],
    )
    expected = [
        f"{path}:1: prompt is longer than data.max_length",
        f"{path}:3: field 'completion' is missing",
        f"{path}:4: not valid JSON: Expecting value (column 1)",
        f"{path}:5: prompt is longer than data.max_length",
    ]
    examples, skipped = load_examples(str(path), "sft", _upper, on_error="skip")
    assert examples == ["OK"]
    assert skipped == expected

    with pytest.raises(DataError) as info:
        load_examples(str(path), "sft", _upper)
    assert info.value.problems == expected
    assert str(info.value) == (
        f"4 invalid row(s) in {path}:\n"
        + "".join(f"  {p}\n" for p in expected)
        + "Fix them, or set data.on_error=skip to train on the valid rows only (nothing was written)."
    )


def test_load_examples_max_errors_shown(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q"}] * 4 + [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as info:
        load_examples(str(path), "sft", _upper, max_errors_shown=1)
    assert str(info.value) == (
        f"4 invalid row(s) in {path}:\n"
        f"  {path}:1: field 'completion' is missing\n"
        "  ... and 3 more\n"
        "Fix them, or set data.on_error=skip to train on the valid rows only (nothing was written)."
    )


def test_load_examples_skip_with_every_row_bad_raises(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q"}, {"prompt": "q", "completion": "too long"}])
    with pytest.raises(DataError) as info:
        load_examples(str(path), "sft", _upper, on_error="skip")
    assert str(info.value) == (
        f"every row of {path} is invalid (2 rows):\n"
        f"  {path}:1: field 'completion' is missing\n"
        f"  {path}:2: prompt is longer than data.max_length"
    )


def test_load_examples_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples(str(path), "sft", _upper)
    assert str(info.value) == f"{path}: no rows found"


def test_load_examples_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": c} for c in "abc"])
    assert load_examples(str(path), "sft", _upper, max_samples=2) == (["A", "B"], [])


# --------------------------------------------------------------------------------------------------
# split_holdout


def test_split_holdout_deterministic_and_disjoint():
    items = list(range(100))
    train, held = split_holdout(items, 0.1, seed=3)
    assert (train, held) == split_holdout(items, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # original order kept on both sides
    assert split_holdout(items, 0.1, seed=4)[1] != held


def test_split_holdout_at_least_one():
    train, held = split_holdout(list(range(5)), 0.01, seed=0)
    assert len(held) == 1 and len(train) == 4


def test_split_holdout_nothing_to_hold_out():
    assert split_holdout([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    assert split_holdout([1], 0.5, seed=0) == ([1], [])


def test_split_holdout_always_keeps_a_training_item():
    train, held = split_holdout([0, 1], 0.8, seed=0)
    assert len(train) >= 1 and len(held) >= 1
