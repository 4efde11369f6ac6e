"""Annotators: who decides which of two answers is better.

An annotator is anything with a `name` and `prefer(prompt, a, b) -> int` (0: a, 1: b, -1: tie / no
preference). Score-based annotators also have `score(prompt, response) -> float` and prefer the higher
score; `ScoreAnnotator` turns any such function into an annotator, with a tie band (`min_gap`) and an
optional Bradley-Terry noise model (`temperature`) for simulating imperfect people:

    P(a preferred over b) = sigmoid((s_a - s_b) / temperature)        (Bradley & Terry, 1952)

Built-ins (`sentiment`, `length`) double as PPO's rule-based rewards through `sentiment_scores` and
`length_scores`, which share one signature: `(prompts, completions) -> list[float]`.

Plug-ins are named `module:attribute`, where the attribute is an annotator class or instance, or a plain
function `(prompt, response) -> float` that becomes a `ScoreAnnotator`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from rlhfkit.errors import RlhfkitError

A, B, TIE = 0, 1, -1
ScoreFn = Callable[[str, str], float]


@runtime_checkable
class Annotator(Protocol):
    """Compares two answers to one prompt: 0 if `a` is preferred, 1 if `b`, -1 for no preference."""

    name: str

    def prefer(self, prompt: str, a: str, b: str) -> int: ...


@dataclass
class ScoreAnnotator:
    """Prefers the answer with the higher `score_fn(prompt, response)`.

    Scores closer than `min_gap` (and equal scores, always) are a tie. With `temperature` t > 0 the choice
    is a Bradley-Terry coin flip, P(a) = sigmoid((s_a - s_b) / t), drawn from a `random.Random(seed)` the
    annotator owns: the same seed and the same sequence of comparisons give the same labels.
    """

    name: str
    score_fn: ScoreFn
    min_gap: float = 0.0
    temperature: float = 0.0
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("min_gap", "temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise RlhfkitError(f"annotator '{self.name}': option '{key}' must be a finite number >= 0, got {value!r}")
        self._rng = random.Random(self.seed)

    def score(self, prompt: str, response: str) -> float:
        value = self.score_fn(prompt, response)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RlhfkitError(f"annotator '{self.name}' returned {value!r} as a score; expected a finite number")
        return float(value)

    def prefer(self, prompt: str, a: str, b: str) -> int:
        return self.prefer_scores(self.score(prompt, a), self.score(prompt, b))

    def prefer_scores(self, score_a: float, score_b: float) -> int:
        """The decision for two already computed scores (lets callers score each answer once)."""
        gap = score_a - score_b
        if gap == 0 or abs(gap) < self.min_gap:
            return TIE
        if self.temperature == 0:
            return A if gap > 0 else B
        p_a = 1.0 / (1.0 + math.exp(-max(min(gap / self.temperature, 700.0), -700.0)))
        return A if self._rng.random() < p_a else B


# --------------------------------------------------------------------------------------------------
# Built-in scorers (also PPO's rule-based rewards)


@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    """The VADER analyzer; built once because it parses its lexicon (read-only afterwards)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_score(prompt: str, response: str) -> float:
    """VADER compound sentiment of `response`, in [-1, 1] (Hutto & Gilbert, 2014). The prompt is ignored."""
    return float(_vader().polarity_scores(response)["compound"])


def length_score(prompt: str, response: str, prefer: Literal["shorter", "longer"] = "shorter") -> float:
    """Word count of `response`, negated when shorter is better (so higher is always better)."""
    words = len(response.split())
    return float(-words if prefer == "shorter" else words)


def _check_batch(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")


def sentiment_scores(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """VADER compound score of each completion, in [-1, 1]; higher = more positive."""
    _check_batch(prompts, completions)
    return [sentiment_score(p, c) for p, c in zip(prompts, completions)]


def length_scores(
    prompts: Sequence[str], completions: Sequence[str], prefer: Literal["shorter", "longer"] = "shorter"
) -> list[float]:
    """Word count of each completion, negated for `prefer="shorter"`; higher = better."""
    _check_batch(prompts, completions)
    return [length_score(p, c, prefer) for p, c in zip(prompts, completions)]


def sentiment_annotator(min_gap: float = 0.0, temperature: float = 0.0, seed: int = 0) -> ScoreAnnotator:
    """Prefers the more positive answer (VADER compound score)."""
    return ScoreAnnotator("sentiment", sentiment_score, min_gap=min_gap, temperature=temperature, seed=seed)


def length_annotator(
    prefer: Literal["shorter", "longer"] = "shorter", min_gap: float = 0.0, temperature: float = 0.0, seed: int = 0
) -> ScoreAnnotator:
    """Prefers the shorter (or longer) answer, counted in words."""
    if prefer not in ("shorter", "longer"):
        raise RlhfkitError(f"annotator 'length': option 'prefer' must be 'shorter' or 'longer', got {prefer!r}")
    return ScoreAnnotator(
        "length", functools.partial(length_score, prefer=prefer), min_gap=min_gap, temperature=temperature, seed=seed
    )


BUILTINS: dict[str, Callable[..., ScoreAnnotator]] = {"sentiment": sentiment_annotator, "length": length_annotator}


# --------------------------------------------------------------------------------------------------
# Loading by name or `module:attribute`


def is_score_based(annotator: Annotator) -> bool:
    return callable(getattr(annotator, "score", None))


def load_annotator(spec: str | Annotator, **options: Any) -> Annotator:
    """A built-in name (`sentiment`, `length`) or `module:attribute`, built with `options`.

    The attribute may be an annotator class (called with `options`), an annotator instance (no options),
    or a function `(prompt, response) -> float` (options go to `ScoreAnnotator`: min_gap, temperature,
    seed). A class or instance with `score` but no `prefer` is wrapped in a `ScoreAnnotator` too.
    """
    if not isinstance(spec, str):
        if options:
            raise RlhfkitError(f"annotator '{getattr(spec, 'name', spec)}' is already built; options cannot be applied")
        return _as_annotator(spec, str(getattr(spec, "name", type(spec).__name__)))
    spec = spec.strip()
    if ":" not in spec:
        if spec not in BUILTINS:
            raise RlhfkitError(
                f"unknown annotator '{spec}'; built-ins: {', '.join(BUILTINS)} "
                "(or name a plug-in as module:attribute, e.g. my_labels:Judge)"
            )
        return _build(BUILTINS[spec], spec, options)

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RlhfkitError(f"annotator '{spec}': expected module:attribute, e.g. my_labels:Judge")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RlhfkitError(
            f"annotator '{spec}': module '{module_name}' is not importable ({exc}); "
            "is it installed, or on PYTHONPATH?"
        ) from None
    except Exception as exc:  # the plug-in's own code failed while importing
        raise RlhfkitError(f"annotator '{spec}': importing module '{module_name}' failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise RlhfkitError(
                f"annotator '{spec}': module '{module_name}' has no attribute '{attr}'"
                + (f"; it defines: {', '.join(public)}" if public else "")
            )
        obj = getattr(obj, part)

    if inspect.isclass(obj):
        return _as_annotator(_build(obj, spec, options), spec)
    if _is_annotator_like(obj):
        if options:
            raise RlhfkitError(f"annotator '{spec}' is an instance; options ({', '.join(options)}) cannot be applied")
        return _as_annotator(obj, spec)
    if callable(obj):
        try:
            inspect.signature(obj).bind("prompt", "response")
        except TypeError:
            raise RlhfkitError(
                f"annotator '{spec}': function {attr}{inspect.signature(obj)} cannot be called as "
                "(prompt, response) -> float"
            ) from None
        except ValueError:  # builtins without a signature: trust them
            pass
        return _build(functools.partial(ScoreAnnotator, spec, obj), spec, options)
    raise RlhfkitError(
        f"annotator '{spec}' is {type(obj).__name__} {obj!r:.60}; expected an annotator class or instance "
        "(with prefer(prompt, a, b) or score(prompt, response)) or a function (prompt, response) -> float"
    )


def _is_annotator_like(obj: Any) -> bool:
    return callable(getattr(obj, "prefer", None)) or callable(getattr(obj, "score", None))


def _build(factory: Callable[..., Any], spec: str, options: dict[str, Any]) -> Any:
    """Call `factory(**options)`, turning a bad option into an error that lists the accepted ones."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in accepted]
    if unknown and params and not takes_any:
        raise RlhfkitError(
            f"annotator '{spec}' has no option {', '.join(repr(k) for k in unknown)}; "
            f"options: {', '.join(accepted) or 'none'}"
        )
    try:
        return factory(**options)
    except RlhfkitError:
        raise
    except Exception as exc:
        raise RlhfkitError(f"annotator '{spec}': could not be created: {type(exc).__name__}: {exc}") from None


def _as_annotator(obj: Any, spec: str) -> Annotator:
    """Check an annotator object; wrap a score-only one; give it a name if it has none."""
    if not _is_annotator_like(obj):
        raise RlhfkitError(
            f"annotator '{spec}' built a {type(obj).__name__}, which has neither prefer(prompt, a, b) "
            "nor score(prompt, response)"
        )
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        name = spec
    if not callable(getattr(obj, "prefer", None)):
        return ScoreAnnotator(name, obj.score)
    if getattr(obj, "name", None) != name:
        try:
            obj.name = name
        except AttributeError:
            pass
    return obj
