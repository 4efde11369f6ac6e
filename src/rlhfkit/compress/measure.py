"""What `rlhfkit compress` measures on the model before and after: size on disk, CPU generation speed,
perplexity on a reference text set, how far the logits moved, and any caller-supplied quality score.

- **size**: bytes of every file in the folder (weights, config, tokenizer), so formats compare as shipped.
- **tokens/s**: greedy `generate` of a fixed number of new tokens (EOS suppressed with `min_new_tokens`,
  so every model does the same work) on a fixed, left-padded batch of reference prompts; one warm-up
  call, then the median of `repeats` timed calls. The machine is shared and noisy: compare the ratio
  within one run, not absolute numbers across runs.
- **perplexity**: `exp(mean NLL)` of the reference completions given their prompts, tokenized exactly as
  SFT tokenizes them (`tokenize_sft`, chat template when the tokenizer has one, completion tokens only).
- **logits**: on the first reference examples, max |Δ|, relative error ‖Δ‖/‖before‖ over real
  (non-pad) positions, and top-1 agreement.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.formats import RowProblem, Sample, enforce, validate_rows
from rlhfkit.data.sources import load_rows
from rlhfkit.data.tokenize import IGNORE, TokenizedExample, tokenize_prompt, tokenize_sft
from rlhfkit.errors import DataError, RlhfkitError

QualityFn = Callable[[PreTrainedModel, PreTrainedTokenizerBase], dict[str, float]]
"""`quality(model, tokenizer) -> {"name": value}`: a held-out score (reward, sentiment) from the caller."""
MAX_LENGTH = 256
"""Reference examples are cut to this many tokens: perplexity stays cheap on a CPU."""
CHECK_EXAMPLES = 4
"""How many reference examples the logit check runs on."""


def folder_size(folder: Path, exclude: tuple[str, ...] = ("compress.json",)) -> int:
    """Total bytes of the files under `folder` (hidden files such as `.complete` and `exclude` skipped)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*")
               if p.is_file() and p.name not in exclude and not p.name.startswith("."))


def reference_samples(reference: str, max_reference: int) -> list[Sample]:
    """The first `max_reference` rows of `reference` as SFT samples; a bad row is an error naming it."""
    rows = load_rows(reference, max_samples=max_reference)
    samples, problems = validate_rows(rows, "sft")
    enforce(problems, on_error="error", total=len(rows), what=f"the reference set {reference}",
            hint="The reference set needs SFT rows: prompt + completion, messages, or text.")
    if not samples:
        raise RlhfkitError(f"the reference set {reference} has no rows; expected SFT rows (prompt + completion)")
    return samples


def tokenize_reference(samples: list[Sample], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedExample]:
    """Reference samples as SFT examples: loss on completion tokens, cut to MAX_LENGTH tokens."""
    examples, problems = [], []
    for sample in samples:
        try:
            examples.append(tokenize_sft(sample, tokenizer, max_length=MAX_LENGTH, truncation="right"))
        except RowProblem as exc:
            problems.append(f"{sample.where}: {exc}")
    if problems:
        raise DataError(f"{len(problems)} reference row(s) cannot be measured:\n  " + "\n  ".join(problems[:20]),
                        problems)
    return examples


def speed_prompts(samples: list[Sample], tokenizer: PreTrainedTokenizerBase, count: int) -> list[list[int]]:
    """Prompt ids of the first `count` samples (the first 32 tokens of a text-only row)."""
    prompts = []
    for sample in samples[:count]:
        if sample.prompt is not None:
            prompts.append(tokenize_prompt(sample, tokenizer))
        else:
            prompts.append(tokenize_reference([sample], tokenizer)[0].input_ids[:32])
    return prompts


@torch.no_grad()
def perplexity(model: PreTrainedModel, examples: list[TokenizedExample], pad_id: int, batch_size: int = 8) -> float:
    """exp(total NLL / number of labelled tokens) over `examples`, next-token prediction."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]  # position t predicts token t+1
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((labels != IGNORE).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def tokens_per_second(model: PreTrainedModel, prompts: list[list[int]], pad_id: int, new_tokens: int,
                      repeats: int = 3) -> float:
    """New tokens per second of greedy generation of exactly `new_tokens` tokens for the whole batch."""
    ids, mask = _left_padded(prompts, pad_id)

    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=pad_id, use_cache=True)
        return time.perf_counter() - start

    run(2)  # warm-up: first-call allocations and kernel selection
    seconds = statistics.median(run(new_tokens) for _ in range(repeats))
    return len(prompts) * new_tokens / seconds


@dataclass
class LogitBatch:
    """Check inputs: right-padded (B, T) ids and mask, shared by the before and after models."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def check_batch(examples: list[TokenizedExample], pad_id: int, max_tokens: int = 64) -> LogitBatch:
    cut = [TokenizedExample(e.where, e.input_ids[:max_tokens], e.labels[:max_tokens]) for e in examples[:CHECK_EXAMPLES]]
    batch = pad_batch(cut, pad_id)
    return LogitBatch(batch["input_ids"], batch["attention_mask"])


@torch.no_grad()
def logits_on(model: torch.nn.Module, batch: LogitBatch) -> torch.Tensor:
    """float32 logits (B, T, V) of `model` on the check batch."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


def compare_logits(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """max |Δ|, ‖Δ‖/‖before‖ and top-1 agreement over positions where mask == 1."""
    keep = mask.bool()
    a, b = before[keep], after[keep]  # (N, V)
    diff = b - a
    return {
        "max_abs_diff": float(diff.abs().max()),
        "rel_err": float(diff.norm() / a.norm().clamp_min(1e-12)),
        "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def run_quality(quality: QualityFn | None, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """Call the caller's quality hook; its result must map names to numbers."""
    if quality is None:
        return {}
    scores = quality(model, tokenizer)
    if not isinstance(scores, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                               for k, v in scores.items()):
        raise RlhfkitError(f"the quality function {getattr(quality, '__name__', quality)!r} must return a dict "
                           f"of name -> number, got {scores!r:.200}")
    return {k: float(v) for k, v in scores.items()}


def measure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: list[Sample], *,
            speed_prompt_count: int, speed_new_tokens: int, quality: QualityFn | None) -> dict[str, object]:
    """tokens/s, perplexity and quality of one model (size is added by the caller, who knows the folder)."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = tokenize_reference(samples, tokenizer)
    out: dict[str, object] = {"perplexity": perplexity(model, examples, pad_id)}
    if speed_prompt_count > 0 and speed_new_tokens > 0:
        prompts = speed_prompts(samples, tokenizer, speed_prompt_count)
        out["tokens_per_s"] = tokens_per_second(model, prompts, pad_id, speed_new_tokens)
    out["quality"] = run_quality(quality, model, tokenizer)
    return out


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(result: dict) -> str:
    """The printable before/after table of a `compress_model` result."""
    before, after = result["before"], result["after"]
    s = result["settings"]
    rows = [("size on disk (MiB)", before.get("size_mib"), after.get("size_mib")),
            ("size on disk (bytes)", before.get("size_bytes"), after.get("size_bytes")),
            (f"CPU tokens/s ({s['speed_prompts']} prompts x {s['speed_new_tokens']} new, "
             f"{s['torch_threads']} threads)", before.get("tokens_per_s"), after.get("tokens_per_s")),
            (f"perplexity ({s['reference']}, {s['reference_rows']} rows)", before.get("perplexity"),
             after.get("perplexity"))]
    for name in sorted(set(before.get("quality", {})) | set(after.get("quality", {}))):
        rows.append((f"quality: {name}", before["quality"].get(name), after["quality"].get(name)))
    head = ("metric", "before", "after", "after/before")
    lines = [head] + [(name, _fmt(b), _fmt(a), _fmt(a / b) if isinstance(a, (int, float)) and
                       isinstance(b, (int, float)) and b else "-") for name, b, a in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    text = [f"rlhfkit compress: {result['source']} -> {result['format']} ({result['output']})"]
    for i, line in enumerate(lines):
        text.append("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(line)))
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    c = result["check"]
    text.append(f"check ({c['against']}): logits max |diff| {c['max_abs_diff']:.3g}, relative error {c['rel_err']:.3g} "
                f"(limit {c['rel_err_limit']:.3g}), top-1 agreement {c['top1_agree']:.1%}"
                + (", token ids identical" if c.get("tokenizer_ids_equal") else "") + f": {'ok' if c['ok'] else 'FAILED'}")
    if result.get("notes"):
        text.extend(f"note: {n}" for n in result["notes"])
    text.append(f"load: {result['load']}")
    return "\n".join(text)
