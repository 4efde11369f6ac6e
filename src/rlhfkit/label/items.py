"""Project settings and the rows that become label items, checked before anything is written.

A candidates row is one of
    {"prompt": ..., "responses": ["answer 1", "answer 2", ...]}
    {"prompt": ..., "response_a": "...", "response_b": "..."}
    {"prompt": ..., "chosen": "...", "rejected": "..."}          (a preference file, to re-label or audit)
where `prompt` is a string or a message list and a response is a string, or an object
`{"text": "..."}` or `{"media": "clips/ep3.gif"}` (a file inside the project's media folder).
Optional fields: `id` (the item's key, unique; default `item-<n>`), `gold` (a known answer: "a", "b",
"tie" for compare, a best-first list of response indices for rank, a list of scores for rate) and
`priority` (a number; higher is labeled first). Every other field is kept and exported with the labels
(one that the export itself writes or a trainer reads, such as `margin` or `tie`, as `input_<name>`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.data.formats import RowProblem, _field
from rlhfkit.data.sources import Row, _kind, load_rows
from rlhfkit.errors import ConfigError, DataError

KINDS = ("compare", "rank", "rate")
COMPARE_CHOICES = ("a", "b", "tie", "both_bad")
STRENGTHS = ("slightly", "clearly")
MEDIA_TYPES = {".gif": "image/gif", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".webp": "image/webp", ".webm": "video/webm", ".mp4": "video/mp4"}
RESERVED = {"prompt", "responses", "response_a", "response_b", "chosen", "rejected", "id", "gold", "priority"}


@dataclass
class Settings:
    """What a project asks of its annotators. Stored in the database; set by `rlhfkit label init`."""

    kind: str = "compare"
    """compare (two answers), rank (k > 2 answers, best first) or rate (a score per answer)."""
    overlap: int = 1
    """How many different annotators label each item."""
    title: str = "rlhfkit label"
    guidelines: str = ""
    """Markdown shown one click away on every page (rendered without raw HTML)."""
    scale: tuple[int, int] = (1, 7)
    """rate: the lowest and highest score."""
    criteria: list[str] = field(default_factory=lambda: ["overall"])
    """rate: the named criteria each answer is scored on."""
    strength: bool = True
    """compare: offer 'slightly' / 'clearly' (exported as margin 0.5 / 1.0)."""
    rewrite: bool = False
    """Let annotators correct an answer (exported as SFT rows and as chosen over the original)."""
    gold_rate: float = 0.0
    """Share of each annotator's items drawn from the gold items (known answers)."""
    media_dir: str = ""
    """Absolute folder that media candidates are served from (nothing outside it is ever served)."""
    lease_seconds: int = 1800
    """An item shown but not labeled for this long goes back to the queue for someone else."""

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("kind", f"expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.overlap, int) or self.overlap < 1:
            raise ConfigError("overlap", f"expected an integer >= 1, got {self.overlap!r}")
        lo, hi = self.scale
        if not (isinstance(lo, int) and isinstance(hi, int) and lo < hi and hi - lo <= 100):
            raise ConfigError("scale", f"expected two integers LOW-HIGH with LOW < HIGH (e.g. 1-7), got {lo}-{hi}")
        if not self.criteria or any(not c.strip() or len(c) > 60 for c in self.criteria) \
                or len(set(self.criteria)) != len(self.criteria):
            raise ConfigError("criteria", f"expected distinct non-empty names, got {self.criteria!r}")
        if not 0.0 <= self.gold_rate < 1.0:
            raise ConfigError("gold_rate", f"expected a share in [0, 1), got {self.gold_rate}")
        if self.lease_seconds < 10:
            raise ConfigError("lease_seconds", f"expected at least 10 seconds, got {self.lease_seconds}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scale": list(self.scale)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "scale" in known:
            known["scale"] = tuple(known["scale"])
        return cls(**known)


def parse_scale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(p) for p in text.replace(":", "-").split("-"))
    except ValueError:
        raise ConfigError("scale", f"expected LOW-HIGH such as 1-7, got {text!r}") from None
    return lo, hi


@dataclass
class ItemSpec:
    """One validated row: what an item will hold."""

    where: str
    key: str
    prompt: Any
    candidates: list[dict[str, str]]
    gold: Any = None
    priority: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)


def _candidate(value: Any, name: str, media_root: Path | None) -> dict[str, str]:
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"{name} is empty")
        return {"text": value}
    if isinstance(value, dict) and set(value) - {"caption"} == {"text"} and isinstance(value["text"], str):
        if not value["text"].strip():
            raise RowProblem(f"{name} is empty")
        return {"text": value["text"]}
    if isinstance(value, dict) and set(value) - {"caption"} == {"media"} and isinstance(value["media"], str):
        rel = value["media"]
        if media_root is None:
            raise RowProblem(f"{name} is a media file ({rel!r}) but the project has no media folder (--media DIR)")
        check_media_path(media_root, rel, name)
        out = {"media": rel}
        if isinstance(value.get("caption"), str):
            out["caption"] = value["caption"]
        return out
    raise RowProblem(f"{name} has the wrong type: expected a string, {{\"text\": ...}} or {{\"media\": ...}}, "
                     f"got {_kind(value)}")


def check_media_path(media_root: Path, rel: str, name: str = "media") -> Path:
    """The file `rel` inside `media_root`, or RowProblem: absolute paths, `..`, links out of the folder,
    unknown types and missing files are refused."""
    if not rel or os.path.isabs(rel) or "\\" in rel or any(p in ("..", "") for p in Path(rel).parts):
        raise RowProblem(f"{name} {rel!r}: expected a relative path inside the media folder")
    suffix = Path(rel).suffix.lower()
    if suffix not in MEDIA_TYPES:
        raise RowProblem(f"{name} {rel!r}: expected one of {', '.join(MEDIA_TYPES)} files")
    root = media_root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise RowProblem(f"{name} {rel!r} points outside the media folder {root}")
    if not path.is_file():
        raise RowProblem(f"{name} {rel!r}: no such file in the media folder {root}")
    return path


def _gold(value: Any, kind: str, n: int, settings: Settings) -> Any:
    if value is None:
        return None
    if kind == "compare":
        if value not in ("a", "b", "tie"):
            raise RowProblem(f"field 'gold': expected \"a\", \"b\" or \"tie\" for a compare item, got {value!r}")
        return value
    if kind == "rank":
        if not (isinstance(value, list) and sorted(value) == list(range(n))
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise RowProblem(f"field 'gold': expected a best-first ranking of the response indices 0..{n - 1}, "
                             f"got {value!r}")
        return value
    lo, hi = settings.scale
    if not (isinstance(value, list) and len(value) == n and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi for v in value)):
        raise RowProblem(f"field 'gold': expected {n} scores in {lo}..{hi}, one per response, got {value!r}")
    return value


def parse_row(row: Row, n: int, settings: Settings, media_root: Path | None) -> ItemSpec:
    d = row.data or {}
    prompt = _field(d, "prompt", allow_messages=True)
    if "responses" in d:
        raw = d["responses"]
        if not isinstance(raw, list):
            raise RowProblem(f"field 'responses' has the wrong type: expected a list, got {_kind(raw)}")
        names = [f"field 'responses' item {i}" for i in range(len(raw))]
        cands = [_candidate(v, name, media_root) for v, name in zip(raw, names)]
    elif "response_a" in d or "response_b" in d:
        names = ["field 'response_a'", "field 'response_b'"]
        cands = [_candidate(d.get(k), f"field '{k}'", media_root) if d.get(k) is not None
                 else _missing(k) for k in ("response_a", "response_b")]
    elif "chosen" in d or "rejected" in d:
        names = ["field 'chosen'", "field 'rejected'"]
        cands = [_candidate(d.get(k), f"field '{k}'", media_root) if d.get(k) is not None
                 else _missing(k) for k in ("chosen", "rejected")]
    else:
        raise RowProblem("expected field 'responses' (a list), or 'response_a' and 'response_b', or 'chosen' and "
                         "'rejected'; found " + (", ".join(f"'{k}'" for k in d) or "none"))
    need = {"compare": "exactly 2", "rank": "at least 3", "rate": "at least 1"}[settings.kind]
    ok = {"compare": len(cands) == 2, "rank": len(cands) >= 3, "rate": len(cands) >= 1}[settings.kind]
    if not ok or len(cands) > 20:
        raise RowProblem(f"a {settings.kind} item needs {need} responses (at most 20), got {len(cands)}")
    texts = [c.get("text") or c.get("media") for c in cands]
    for j, text in enumerate(texts):
        if text in texts[:j]:
            raise RowProblem(f"{names[j]} is identical to {names[texts.index(text)]} (nothing to choose between)")
    key = d.get("id", f"item-{n}")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key.strip() or len(key) > 200:
        raise RowProblem(f"field 'id': expected a non-empty string of at most 200 characters, got {key!r}")
    priority = d.get("priority", 0.0)
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not math.isfinite(priority):
        raise RowProblem(f"field 'priority': expected a finite number, got {priority!r}")
    gold = _gold(d.get("gold"), settings.kind, len(cands), settings)
    source = {k: v for k, v in d.items() if k not in RESERVED}
    if "chosen" in d:
        source["original"] = "chosen_first"  # candidate 0 was the file's chosen answer (for audits)
    return ItemSpec(row.where, key, prompt, cands, gold, float(priority), source)


def _missing(name: str) -> dict[str, str]:
    raise RowProblem(f"field '{name}' is missing")


def parse_rows(rows: list[Row], settings: Settings, what: str, first_index: int = 1) -> list[ItemSpec]:
    """Validate every row; raise one DataError listing every bad row (`file:line: problem`)."""
    media_root = Path(settings.media_dir) if settings.media_dir else None
    specs, problems, seen = [], [], {}
    for i, row in enumerate(rows):
        if row.error is not None:
            problems.append(f"{row.where}: {row.error}")
            continue
        try:
            spec = parse_row(row, first_index + i, settings, media_root)
        except RowProblem as exc:
            problems.append(f"{row.where}: {exc}")
            continue
        if spec.key in seen:
            problems.append(f"{row.where}: field 'id' {spec.key!r} repeats {seen[spec.key]}")
            continue
        seen[spec.key] = row.where
        specs.append(spec)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} invalid row(s) in {what} (nothing was created):\n{shown}{more}", problems)
    if not specs:
        raise DataError(f"{what}: no rows (nothing was created)")
    return specs


def load_items(path: str, settings: Settings, first_index: int = 1) -> list[ItemSpec]:
    return parse_rows(load_rows(path), settings, path, first_index)
