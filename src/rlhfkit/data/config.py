"""The data section shared by the training recipes (each recipe may add fields or change defaults)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from rlhfkit.config import opt
from rlhfkit.data.formats import Kind, Sample
from rlhfkit.data.prepare import load_examples, split_holdout

T = TypeVar("T")


@dataclass
class DataConfig:
    train: str = opt("", "training data: .jsonl/.json/.csv/.parquet file, bundled:NAME, or HF dataset name")
    split: str = opt("train", "split to read when train is a Hugging Face dataset")
    eval: str = opt("", "eval data (same forms as train); empty = hold out eval_fraction of train")
    eval_split: str = opt("validation", "split to read when eval is a Hugging Face dataset")
    eval_fraction: float = opt(0.05, "fraction of train held out for eval when eval is empty", ge=0.0, lt=1.0)
    max_samples: int = opt(0, "use at most this many training rows; 0 = all", ge=0)
    max_length: int = opt(512, "maximum tokens per example (prompt + response)", gt=1)
    truncation: Literal["right", "error"] = opt("right", "too-long examples: cut the end (right) or report an error")
    chat_template: Literal["auto", "always", "never"] = opt(
        "auto", "apply the tokenizer's chat template: auto = when it has one"
    )
    shuffle: bool = opt(True, "shuffle the training order every epoch (seeded)")
    group_by_length: bool = opt(True, "batch examples of similar length together to reduce padding")
    on_error: Literal["error", "skip"] = opt("error", "bad rows: stop listing them (error) or skip them (skip)")
    max_errors_shown: int = opt(20, "how many bad rows to list before '... and N more'", gt=0)


def load_train_eval(d: DataConfig, kind: Kind, transform: Callable[[Sample], T], seed: int
                    ) -> tuple[list[T], list[T], list[str]]:
    """Train and eval examples (eval from d.eval, or held out of train) and the skipped-row problems."""
    train, skipped = load_examples(d.train, kind, transform, split=d.split, max_samples=d.max_samples,
                                   on_error=d.on_error, max_errors_shown=d.max_errors_shown)
    if d.eval:
        evals, more = load_examples(d.eval, kind, transform, split=d.eval_split, on_error=d.on_error,
                                    max_errors_shown=d.max_errors_shown)
        return train, evals, skipped + more
    train, evals = split_holdout(train, d.eval_fraction, seed)
    return train, evals, skipped
