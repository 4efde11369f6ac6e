"""Candidate answers -> labeled preference pairs -> a `preference` JSONL file.

    prompts --generate_pairs--> Candidates (k distinct answers each)
            --label_pairs-----> rows {"prompt", "chosen", "rejected", ["chosen_score", "rejected_score"], "annotator"}
            --write_preferences-> file.jsonl (atomic, then checked with the `preference` validator)

The rows are the `preference` format of rlhfkit.data.formats (extra fields are ignored by readers), so a
file labeled by people, with the same three required fields, trains reward models and DPO the same way.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.data.formats import RowProblem, Sample, Text, validate_rows
from rlhfkit.data.sources import load_rows
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.data.write import write_jsonl
from rlhfkit.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.feedback.annotators import TIE, Annotator, is_score_based, load_annotator
from rlhfkit.rollout.generate import generate_text
from rlhfkit.runtime.optim import autocast_dtype


@dataclass
class Candidates:
    """The distinct, non-empty answers sampled for one prompt (in sampling order)."""

    prompt: Text
    completions: list[str]
    duplicates: int = 0
    """Answers dropped because an earlier answer to the same prompt was identical."""
    empty: int = 0
    """Answers dropped because they were empty (e.g. EOS as the first token)."""
    unfinished: int = 0
    """Answers that hit the token budget before EOS and were dropped (unfinished="drop", or "trim" when no
    sentence of them was complete)."""
    trimmed: int = 0
    """Answers that hit the budget and were cut back to their last complete sentence (unfinished="trim")."""


@dataclass
class LabelStats:
    prompts: int = 0
    pairs: int = 0
    """Preference rows produced."""
    ties: int = 0
    """Prompts whose compared answers were a tie (no row)."""
    too_few: int = 0
    """Prompts left with fewer than 2 distinct non-empty answers (no row)."""
    duplicates: int = 0
    empty: int = 0
    unfinished: int = 0
    trimmed: int = 0


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def last_sentence(text: str) -> str:
    """`text` up to the end of its last complete sentence ('.', '!' or '?', closing quotes or brackets
    kept), or "" when no sentence ends in it."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else ""


def prompt_text(prompt: Text) -> str:
    """What an annotator sees as the prompt: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


# --------------------------------------------------------------------------------------------------
# Sampling


def generate_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Text],
    *,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    unfinished: str = "keep",
    mixed_precision: str = "no",
) -> list[Candidates]:
    """Sample `samples_per_prompt` answers per prompt; drop exact duplicates and empty answers.

    `unfinished` says what happens to an answer that hit `max_new_tokens` before EOS: `keep` it as it is,
    `drop` it, or `trim` it to its last complete sentence (dropped when it has none). A cut-off text is
    not an answer: a judge who prefers more of something prefers the longer cut-off one, and a policy
    trained on such pairs learns to stop ending its answers. Trimmed, it is a complete answer that a
    person could judge, and its pair teaches the policy to end.

    Batches hold consecutive (prompt, sample) slots, k copies of each prompt in a row. Torch is seeded
    with `seed + batch index` before each batch, inside `fork_rng` so the caller's RNG is left untouched:
    the same seed, batch size, model and precision give the same answers on the same machine.

    `mixed_precision`: the autocast of the sampling forwards: no (default) = the model's own dtype; bf16;
    auto = bf16 on CUDA GPUs that support it and on CPUs with native bf16. bf16 samples about 1.4x faster
    on such a CPU, but the demo's reward model and DPO learned less from bf16-sampled pairs (docs/feedback.md).
    """
    if samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt", f"expected at least 2 answers per prompt to compare, got {samples_per_prompt}")
    if not temperature > 0:
        raise ConfigError("temperature", f"expected > 0: candidates must be sampled to differ, got {temperature}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError("batch_size" if batch_size < 1 else "max_new_tokens", "expected a value >= 1")
    device = next(model.parameters()).device
    dtype = autocast_dtype(mixed_precision, device, cpu_bf16=True, field="mixed_precision")
    prompt_ids = []
    for i, prompt in enumerate(prompts):
        try:
            prompt_ids.append(tokenize_prompt(Sample(f"prompt {i + 1}", prompt=prompt), tokenizer))
        except RowProblem as exc:
            raise DataError(f"prompt {i + 1}: {exc}") from None
    slots = [ids for ids in prompt_ids for _ in range(samples_per_prompt)]  # (P * k) prompt copies

    answers: list[str] = []
    for b, start in enumerate(range(0, len(slots), batch_size)):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + b)
            out = generate_text(
                model, tokenizer, slots[start : start + batch_size], max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, batch_size=batch_size, autocast_dtype=dtype,
            )
        answers.extend((text, ended) for text, _, ended in out)

    candidates = []
    for i, prompt in enumerate(prompts):
        group = answers[i * samples_per_prompt : (i + 1) * samples_per_prompt]
        kept: list[str] = []
        empty = duplicates = dropped = trimmed = 0
        for text, ended in group:
            if text.strip() and not ended and unfinished != "keep":
                cut = last_sentence(text) if unfinished == "trim" else ""
                if not cut:
                    dropped += 1
                    continue
                text, trimmed = cut, trimmed + 1
            if not text.strip():
                empty += 1
            elif text in kept:
                duplicates += 1
            else:
                kept.append(text)
        candidates.append(Candidates(prompt, kept, duplicates=duplicates, empty=empty, unfinished=dropped,
                                     trimmed=trimmed))
    return candidates


# --------------------------------------------------------------------------------------------------
# Labeling


def label_pairs(candidates: list[Candidates], annotator: Annotator,
                pairing: str = "best_worst") -> tuple[list[dict[str, Any]], LabelStats]:
    """Preference rows from each prompt's answers; ties and prompts with < 2 answers give none (counted).

    pairing="best_worst" (one row per prompt): score-based annotators compare the best against the worst
    answer by score (the widest gap, so the clearest signal); pure comparators compare the first two.
    pairing="all": every pair of a prompt's answers is put to the annotator (k answers, up to k(k-1)/2
    rows; an annotator's `min_gap` turns the closest pairs into ties). More rows from the same sampling
    cost, and pairs of every difficulty, not only the easiest one.
    """
    if pairing not in ("best_worst", "all"):
        raise ConfigError("pairing", f"expected best_worst or all, got {pairing!r}")
    if pairing == "all":
        return _label_all_pairs(candidates, annotator)
    stats = LabelStats(prompts=len(candidates))
    rows: list[dict[str, Any]] = []
    scored = is_score_based(annotator)
    for cand in candidates:
        answers = cand.completions
        if not _count(stats, cand):
            continue
        text = prompt_text(cand.prompt)
        scores: list[float] | None = None
        if scored:
            scores = [_checked_score(annotator, text, answer) for answer in answers]
            best = max(range(len(answers)), key=lambda j: scores[j])  # first of equals: stable
            worst = min(range(len(answers)), key=lambda j: scores[j])
            if best == worst:  # all equal
                worst = 1 if best == 0 else 0
            pair = (best, worst)
            decide = getattr(annotator, "prefer_scores", None)
            if callable(decide):
                choice = decide(scores[best], scores[worst])
            else:
                choice = annotator.prefer(text, answers[best], answers[worst])
        else:
            pair = (0, 1)
            choice = annotator.prefer(text, answers[0], answers[1])
        if choice not in (0, 1, TIE):
            raise RlhfkitError(f"annotator '{annotator.name}' returned {choice!r} from prefer(); expected 0, 1 or -1")
        if choice == TIE:
            stats.ties += 1
            continue
        chosen, rejected = (pair[0], pair[1]) if choice == 0 else (pair[1], pair[0])
        rows.append(_row(cand, answers[chosen], answers[rejected],
                         None if scores is None else (scores[chosen], scores[rejected]), annotator.name))
    stats.pairs = len(rows)
    return rows, stats


def _row(cand: Candidates, chosen: str, rejected: str, scores: tuple[float, float] | None, name: str) -> dict[str, Any]:
    # After a message-list prompt the answers are assistant messages: the pair tokenizer wants prompt
    # and answers both text or both messages.
    reply = (lambda text: [{"role": "assistant", "content": text}]) if isinstance(cand.prompt, list) else str
    row: dict[str, Any] = {"prompt": cand.prompt, "chosen": reply(chosen), "rejected": reply(rejected)}
    if scores is not None:
        row["chosen_score"], row["rejected_score"] = scores
    row["annotator"] = name
    return row


def _count(stats: LabelStats, cand: Candidates) -> bool:
    """Add a prompt's dropped answers to `stats`; False (and counted) when fewer than 2 answers are left."""
    stats.duplicates += cand.duplicates
    stats.empty += cand.empty
    stats.unfinished += cand.unfinished
    stats.trimmed += cand.trimmed
    if len(cand.completions) < 2:
        stats.too_few += 1
        return False
    return True


def _label_all_pairs(candidates: list[Candidates], annotator: Annotator) -> tuple[list[dict[str, Any]], LabelStats]:
    stats = LabelStats(prompts=len(candidates))
    rows: list[dict[str, Any]] = []
    scored = is_score_based(annotator)
    decide = getattr(annotator, "prefer_scores", None)
    for cand in candidates:
        answers = cand.completions
        if not _count(stats, cand):
            continue
        text = prompt_text(cand.prompt)
        scores = [_checked_score(annotator, text, a) for a in answers] if scored else None
        kept = 0
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                if scores is not None and callable(decide):
                    choice = decide(scores[i], scores[j])
                else:
                    choice = annotator.prefer(text, answers[i], answers[j])
                if choice not in (0, 1, TIE):
                    raise RlhfkitError(f"annotator '{annotator.name}' returned {choice!r} from prefer(); expected 0, 1 or -1")
                if choice == TIE:
                    continue
                c, r = (i, j) if choice == 0 else (j, i)
                rows.append(_row(cand, answers[c], answers[r], None if scores is None else (scores[c], scores[r]),
                                 annotator.name))
                kept += 1
        if not kept:
            stats.ties += 1
    stats.pairs = len(rows)
    return rows, stats


def _checked_score(annotator: Any, prompt: str, answer: str) -> float:
    value = annotator.score(prompt, answer)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RlhfkitError(f"annotator '{annotator.name}' returned {value!r} as a score; expected a finite number")
    return float(value)


# --------------------------------------------------------------------------------------------------
# Writing


def write_preferences(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` as JSONL at `path`, atomically, and only if they read back as valid `preference` rows
    (see rlhfkit.data.write); on any failure `path` is untouched."""
    return write_jsonl(rows, path, "preference", what="preference rows")


# --------------------------------------------------------------------------------------------------
# End to end


def load_prompts(source: str, max_prompts: int = 0) -> list[Text]:
    """Prompts from any `prompt`-format source (file, `bundled:NAME`, dataset); every bad row is listed."""
    rows = load_rows(source, max_samples=max_prompts)
    samples, problems = validate_rows(rows, "prompt")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} invalid row(s) in the prompts {source} (expected a 'prompt' field):\n"
                        f"{shown}{more}", problems)
    if not samples:
        raise DataError(f"{source}: no prompts")
    return [s.prompt for s in samples]  # type: ignore[misc]


def simulate_feedback(
    model_spec: str,
    prompts: str,
    output: str,
    *,
    annotator: str | Annotator = "sentiment",
    annotator_options: dict[str, Any] | None = None,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_prompts: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    pairing: str = "best_worst",
    unfinished: str = "keep",
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """Sample answers from `model_spec` for each prompt, label them with `annotator`, write `output`.

    Inputs are checked before the model is loaded (annotator, output name, every prompt row), and the
    output is written only when at least one pair was labeled. Returns the counts and timings.
    """
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer, resolve_device

    judge = load_annotator(annotator, **(annotator_options or {}))
    if pairing not in ("best_worst", "all"):
        raise ConfigError("pairing", f"expected best_worst or all, got {pairing!r}")
    if unfinished not in ("keep", "drop", "trim"):
        raise ConfigError("unfinished", f"expected keep, drop or trim, got {unfinished!r}")
    out_path = Path(os.path.expanduser(output))
    if out_path.suffix.lower() != ".jsonl":
        raise DataError(f"{output}: preference files are written as JSONL; name the output file *.jsonl")
    prompt_list = load_prompts(prompts, max_prompts)

    t0 = time.perf_counter()
    cfg = ModelConfig(name=model_spec, device=device)
    cfg.validate()
    torch_device = resolve_device(device)
    sample_dtype = autocast_dtype(mixed_precision, torch_device, cpu_bf16=True, field="mixed_precision")
    tokenizer = load_tokenizer(model_spec)
    model = load_causal_lm(cfg, device=torch_device, tokenizer=tokenizer)
    t1 = time.perf_counter()
    candidates = generate_pairs(
        model, tokenizer, prompt_list, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, unfinished=unfinished,
        mixed_precision=mixed_precision,
    )
    t2 = time.perf_counter()
    rows, stats = label_pairs(candidates, judge, pairing)
    t3 = time.perf_counter()
    if not rows:
        raise DataError(
            f"no preference pairs to write to {output}: of {stats.prompts} prompts, {stats.ties} were ties and "
            f"{stats.too_few} had fewer than 2 distinct answers ({stats.unfinished} answers were cut off by the "
            "token budget). Sample more answers per prompt, raise the temperature or max_new_tokens, or lower the "
            "annotator's min_gap. Nothing was written."
        )
    write_preferences(rows, out_path)

    result: dict[str, Any] = {"output": str(out_path), "annotator": judge.name, "model": model_spec,
                              "device": str(torch_device),
                              "sampling_autocast": str(sample_dtype).removeprefix("torch.") if sample_dtype else "none",
                              **asdict(stats)}
    if rows and "chosen_score" in rows[0]:
        result["mean_chosen_score"] = sum(r["chosen_score"] for r in rows) / len(rows)
        result["mean_rejected_score"] = sum(r["rejected_score"] for r in rows) / len(rows)
    result.update(load_seconds=t1 - t0, generate_seconds=t2 - t1, label_seconds=t3 - t2,
                  seconds=time.perf_counter() - t0)
    return result
