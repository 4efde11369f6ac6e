"""Reward sources for online RL: a weighted sum of reward models, built-in scorers and user functions.

`reward.sources` lists them, each `SOURCE` or `WEIGHT*SOURCE`:

- a folder written by `rlhfkit reward` (or any scalar *ForSequenceClassification folder): completions
  are decoded to text and re-tokenized with the reward model's own tokenizer and chat template, so the
  policy and the reward model may come from different families; the score is read at the last real
  token and, when the folder carries training statistics, z-normalized with them (`reward.normalize_model`);
- a built-in scorer: `sentiment` (VADER compound in [-1, 1]) or `length` (minus the word count;
  `-0.01*length` rewards longer answers);
- `module:function`: `function(prompts, completions) -> list[float]`, called once per batch with
  the prompts as the data gave them (strings or message lists) and the decoded completions; a function
  that also takes `completion_ids` (or `**kwargs`) receives the completions' token ids (EOS excluded).

The total is `sum(weight_i * score_i)`; each source's mean is also reported on its own.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import ConfigError, RlhfkitError

BUILTIN_SCORERS = ("sentiment", "length")
_WEIGHTED = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*(.+?)\s*$")

ScoreFn = Callable[..., list[float]]


@dataclass
class RewardSource:
    name: str
    weight: float
    score: ScoreFn
    wants_ids: bool = False
    """Call with `completion_ids=` too (user functions that ask for token ids)."""


def parse_source(text: str, key: str) -> tuple[float, str]:
    """'0.5*sentiment' -> (0.5, 'sentiment'); 'sentiment' -> (1.0, 'sentiment')."""
    match = _WEIGHTED.match(text)
    if match:
        return float(match.group(1)), match.group(2)
    if not text.strip():
        raise ConfigError(key, "empty reward source")
    return 1.0, text.strip()


def _builtin(name: str) -> ScoreFn:
    from rlhfkit.feedback.annotators import length_scores, sentiment_scores

    if name == "sentiment":
        return lambda prompts, completions: sentiment_scores([_text(p) for p in prompts], completions)
    return lambda prompts, completions: length_scores([_text(p) for p in prompts], completions, "shorter")


def _text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return str(prompt)


def _function(spec: str, key: str) -> ScoreFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(key, f"'{spec}': expected module:function, e.g. my_rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(key, f"'{spec}': module '{module_name}' is not importable ({exc}); is it on PYTHONPATH?") from None
    except Exception as exc:
        raise ConfigError(key, f"'{spec}': importing '{module_name}' failed: {type(exc).__name__}: {exc}") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(key, f"'{spec}': module '{module_name}' has no attribute '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(key, f"'{spec}' is {type(fn).__name__}, not a function (prompts, completions) -> list[float]")
    try:
        sig = inspect.signature(fn)
        if "completion_ids" in sig.parameters:
            sig.bind([], [], completion_ids=[])
        else:
            sig.bind([], [])
    except TypeError:
        raise ConfigError(key, f"'{spec}{inspect.signature(fn)}' cannot be called as (prompts, completions)") from None
    except ValueError:
        pass
    return fn


def _wants_ids(fn: ScoreFn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "completion_ids" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _reward_model(folder: str, *, device: torch.device, normalize: bool, batch_size: int, max_length: int,
                  truncation: str = "left") -> ScoreFn:
    from rlhfkit.models.heads import check_scalar, load_reward_model, score_texts

    model, tokenizer = load_reward_model(folder, device)
    check_scalar(model)
    model.requires_grad_(False)
    has_stats = getattr(model.config, "rlhfkit_reward_mean", None) is not None
    use_stats = normalize and has_stats

    warned = False

    def score(prompts: list[Any], completions: list[str]) -> list[float]:
        nonlocal warned
        stats: dict[str, int] = {}
        out = score_texts(model, tokenizer, prompts, completions, batch_size=batch_size, max_length=max_length,
                          normalize=use_stats, truncation=truncation, stats=stats)
        if stats.get("truncated") and not warned:
            warned = True
            print(f"warning: reward model {folder}: {stats['truncated']} of {len(prompts)} inputs were longer than "
                  f"reward.max_length={max_length} tokens; scored on their last {max_length} tokens (the start of "
                  "the prompt is dropped). Raise reward.max_length to score whole inputs.", file=sys.stderr, flush=True)
        return out

    return score


def build_reward_sources(specs: Sequence[str], *, device: torch.device, normalize_model: bool = True,
                         batch_size: int = 16, max_length: int = 1024, truncation: str = "left") -> list[RewardSource]:
    """Parse and load every entry of `reward.sources` (errors name the entry)."""
    if not specs:
        raise ConfigError("reward.sources", "expected at least one reward source: a reward model folder, "
                                            f"{' or '.join(BUILTIN_SCORERS)}, or module:function")
    out = []
    for i, text in enumerate(specs):
        key = f"reward.sources[{i}]"
        weight, spec = parse_source(text, key)
        if Path(spec).is_dir():
            fn = _reward_model(spec, device=device, normalize=normalize_model, batch_size=batch_size,
                               max_length=max_length, truncation=truncation)
        elif spec in BUILTIN_SCORERS:
            fn = _builtin(spec)
        elif ":" in spec and not spec.startswith(("/", ".")):
            fn = _function(spec, key)
        else:
            raise ConfigError(key, f"'{spec}' is neither a reward model folder (none exists there), a built-in "
                                   f"scorer ({', '.join(BUILTIN_SCORERS)}), nor module:function")
        out.append(RewardSource(spec, weight, fn, wants_ids=_wants_ids(fn) and not Path(spec).is_dir()
                                and spec not in BUILTIN_SCORERS))
    return out


def score_each(sources: list[RewardSource], prompts: list[Any], completions: list[str],
               completion_ids: list[list[int]] | None = None) -> list[torch.Tensor]:
    """Each source's unweighted scores (N,) float32, checked (count, finiteness); errors name the source."""
    out = []
    for src in sources:
        extra = {"completion_ids": completion_ids} if src.wants_ids and completion_ids is not None else {}
        try:
            raw = src.score(list(prompts), list(completions), **extra)
        except RlhfkitError:
            raise
        except Exception as exc:
            raise RlhfkitError(f"reward source '{src.name}' failed: {type(exc).__name__}: {exc}") from exc
        out.append(_check_scores(src.name, raw, len(completions)))
    return out


def score_all(sources: list[RewardSource], prompts: list[Any], completions: list[str],
              completion_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total (N,) float32 and each source's mean score (`score/NAME`)."""
    total = torch.zeros(len(completions), dtype=torch.float32)
    parts: dict[str, float] = {}
    for src, key, values in zip(sources, metric_names(sources), score_each(sources, prompts, completions, completion_ids)):
        total += src.weight * values
        parts[key] = values.mean().item() if len(values) else 0.0
    return total, parts


def _check_scores(name: str, raw: Any, n: int) -> torch.Tensor:
    try:
        values = torch.as_tensor([float(x) for x in raw], dtype=torch.float32)
    except (TypeError, ValueError):
        raise RlhfkitError(f"reward source '{name}' must return a list of numbers, got {type(raw).__name__} "
                           f"{str(raw)[:80]!r}") from None
    if values.numel() != n:
        raise RlhfkitError(f"reward source '{name}' returned {values.numel()} scores for {n} completions")
    bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
    if bad:
        raise RlhfkitError(f"reward source '{name}' returned a non-finite score for completion {bad[0]} "
                           f"({values[bad[0]].item()})")
    return values


def metric_names(sources: list[RewardSource]) -> list[str]:
    """`score/NAME` for each source, in order, made unique (`score/NAME_2`, ...)."""
    out: list[str] = []
    for src in sources:
        key, n = f"score/{_metric_name(src.name)}", 2
        while key in out:
            key, n = f"score/{_metric_name(src.name)}_{n}", n + 1
        out.append(key)
    return out


def _metric_name(name: str) -> str:
    if name in BUILTIN_SCORERS:
        return name
    if ":" in name:
        return name.rsplit(":", 1)[-1]
    return "reward_model" if Path(name).name in ("model", "") else Path(name).name
