"""Row schemas (TRL-compatible) and their validation messages.

| kind         | fields                                                                  |
| ------------ | ----------------------------------------------------------------------- |
| `sft`        | `prompt` + `completion` (strings or message lists), or `messages`, or `text` |
| `preference` | `prompt`, `chosen`, `rejected` (strings or message lists), optional `margin` |
| `prompt`     | `prompt` (string or message list)                                        |
| `rating`     | `prompt`, `response` (strings), `score` (number)                         |
| `classification` | `text` (string), `label` (integer >= 0; CSV text such as "2" accepted) |

A message list is `[{"role": "user", "content": "..."}, ...]` with roles system/user/assistant/tool.
Extra fields are ignored. Each problem is reported as `where: field 'x' is missing` (or null, empty, has
the wrong type, ...), and `validate_rows` returns every problem so the user can fix them in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhfkit.data.sources import Row, _kind
from rlhfkit.errors import DataError

Kind = Literal["sft", "preference", "prompt", "rating", "classification"]
Message = dict[str, str]
Text = str | list[Message]
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    """One validated row, normalized. Unused fields stay None."""

    where: str
    prompt: Text | None = None
    completion: Text | None = None
    messages: list[Message] | None = None
    text: str | None = None
    chosen: Text | None = None
    rejected: Text | None = None
    response: str | None = None
    score: float | None = None
    margin: float | None = None
    label: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RowProblem(Exception):
    """Raised inside validation for one row; collected, never shown as a traceback."""


def _absent(data: dict[str, Any], name: str, expected: str, required: bool) -> bool:
    """True when field `name` is absent or null (an optional one); a required one raises, telling a
    missing key from an explicit null: the fix differs (add the field vs. fill in its value)."""
    if name in data and data[name] is not None:
        return False
    if required:
        if name not in data:
            raise RowProblem(f"field '{name}' is missing")
        raise RowProblem(f"field '{name}' is null; expected {expected}")
    return True


def _field(data: dict[str, Any], name: str, *, allow_messages: bool, required: bool = True) -> Text | None:
    expected = "a string or a list of messages" if allow_messages else "a string"
    if _absent(data, name, expected, required):
        return None
    value = data[name]
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"field '{name}' is empty")
        return value
    if allow_messages and isinstance(value, list):
        return _messages(value, name)
    raise RowProblem(f"field '{name}' has the wrong type: expected {expected}, got {_kind(value)}")


def _messages(value: Any, name: str) -> list[Message]:
    if value is None:
        raise RowProblem(f"field '{name}' is null; expected a list of messages")
    if not isinstance(value, list):
        raise RowProblem(f"field '{name}' has the wrong type: expected a list of messages, got {_kind(value)}")
    if not value:
        raise RowProblem(f"field '{name}' is empty")
    out = []
    for i, msg in enumerate(value):
        at = f"field '{name}' message {i}"
        if not isinstance(msg, dict):
            raise RowProblem(f"{at}: expected an object with 'role' and 'content', got {_kind(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if role is None:
            raise RowProblem(f"{at}: 'role' is missing" if "role" not in msg else f"{at}: 'role' is null")
        if role not in ROLES:
            raise RowProblem(f"{at}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        if content is None:
            raise RowProblem(f"{at}: 'content' is missing" if "content" not in msg
                             else f"{at}: 'content' is null; expected a string")
        if not isinstance(content, str):
            raise RowProblem(f"{at}: 'content' has the wrong type: expected a string, got {_kind(content)}")
        if role != "system" and not content.strip():
            raise RowProblem(f"{at}: 'content' is empty")
        out.append({"role": role, "content": content})
    return out


def _number(data: dict[str, Any], name: str, required: bool) -> float | None:
    if _absent(data, name, "a number", required):
        return None
    if isinstance(data[name], str) and not data[name].strip():  # an empty CSV cell: the value was left out
        if required:
            raise RowProblem(f"field '{name}' is missing")
        return None
    value = data[name]
    if isinstance(value, bool):
        raise RowProblem(f"field '{name}' has the wrong type: expected a number, got a boolean")
    if isinstance(value, str):  # CSV cells arrive as text
        try:
            value = float(value)
        except ValueError:
            raise RowProblem(f"field '{name}' has the wrong type: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise RowProblem(f"field '{name}' has the wrong type: expected a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise RowProblem(f"field '{name}' must be a finite number, got {value}")
    return float(value)


def _sft(row: Row) -> Sample:
    d = row.data or {}
    if "messages" in d:
        messages = _messages(d["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RowProblem("field 'messages' has no assistant message to learn from")
        return Sample(row.where, messages=messages)
    if "prompt" in d or "completion" in d:
        prompt = _field(d, "prompt", allow_messages=True)
        completion = _field(d, "completion", allow_messages=True)
        if isinstance(prompt, list) != isinstance(completion, list):
            raise RowProblem("fields 'prompt' and 'completion' must both be strings or both be message lists")
        return Sample(row.where, prompt=prompt, completion=completion)
    if "text" in d:
        return Sample(row.where, text=_field(d, "text", allow_messages=False))
    raise RowProblem("expected fields 'prompt' and 'completion', or 'messages', or 'text'; found "
                     + (", ".join(f"'{k}'" for k in d) or "none"))


def _preference(row: Row) -> Sample:
    d = row.data or {}
    prompt = _field(d, "prompt", allow_messages=True)
    chosen = _field(d, "chosen", allow_messages=True)
    rejected = _field(d, "rejected", allow_messages=True)
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowProblem("fields 'chosen' and 'rejected' must both be strings or both be message lists")
    if chosen == rejected:
        raise RowProblem("field 'chosen' is identical to 'rejected' (a preference needs two different answers)")
    margin = _number(d, "margin", required=False)
    return Sample(row.where, prompt=prompt, chosen=chosen, rejected=rejected, margin=margin)


def _prompt(row: Row) -> Sample:
    return Sample(row.where, prompt=_field(row.data or {}, "prompt", allow_messages=True))


def _rating(row: Row) -> Sample:
    d = row.data or {}
    prompt = _field(d, "prompt", allow_messages=True)
    response = _field(d, "response", allow_messages=False)
    score = _number(d, "score", required=True)
    return Sample(row.where, prompt=prompt, response=response, score=score)


def _label(data: dict[str, Any], name: str) -> int:
    """A class index: an integer >= 0 (JSON 2 or 2.0, CSV text "2")."""
    _absent(data, name, "an integer >= 0", required=True)
    if isinstance(data[name], str) and not data[name].strip():  # an empty CSV cell
        raise RowProblem(f"field '{name}' is missing")
    value = data[name]
    if isinstance(value, bool):
        raise RowProblem(f"field '{name}' has the wrong type: expected an integer >= 0, got a boolean")
    if isinstance(value, str):  # CSV cells arrive as text
        try:
            value = int(value.strip())
        except ValueError:
            raise RowProblem(f"field '{name}' has the wrong type: expected an integer >= 0, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        shown = repr(value) if isinstance(value, float) else _kind(value)
        raise RowProblem(f"field '{name}' has the wrong type: expected an integer >= 0, got {shown}")
    if value < 0:
        raise RowProblem(f"field '{name}' must be an integer >= 0, got {value}")
    return value


def _classification(row: Row) -> Sample:
    d = row.data or {}
    text = _field(d, "text", allow_messages=False)
    return Sample(row.where, text=text, label=_label(d, "label"))


VALIDATORS = {"sft": _sft, "preference": _preference, "prompt": _prompt, "rating": _rating,
              "classification": _classification}


def validate_rows(rows: list[Row], kind: Kind) -> tuple[list[Sample], list[str]]:
    """Validate every row; return the good samples and one `where: problem` line per bad row."""
    check = VALIDATORS[kind]
    samples, problems = [], []
    for row in rows:
        if row.error is not None:
            problems.append(f"{row.where}: {row.error}")
            continue
        try:
            samples.append(check(row))
        except RowProblem as exc:
            problems.append(f"{row.where}: {exc}")
    return samples, problems


def enforce(
    problems: list[str], *, on_error: str, total: int, max_shown: int = 20, what: str = "data",
    hint: str = "Fix them, or set data.on_error=skip to train on the valid rows only (nothing was written).",
) -> list[str]:
    """Apply the `on_error` policy: raise listing the problems, or return them as skipped rows."""
    if not problems:
        return []
    if on_error == "skip" and len(problems) < total:
        return problems
    shown = problems[:max_shown]
    more = len(problems) - len(shown)
    lines = "\n".join(f"  {p}" for p in shown)
    tail = f"\n  ... and {more} more" if more else ""
    if on_error == "skip":
        raise DataError(f"every row of {what} is invalid ({len(problems)} rows):\n{lines}{tail}", problems)
    raise DataError(f"{len(problems)} invalid row(s) in {what}:\n{lines}{tail}\n{hint}", problems)
