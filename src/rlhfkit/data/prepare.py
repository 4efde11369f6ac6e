"""Rows -> validated, transformed examples, with every problem collected before anything is written."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from rlhfkit.data.formats import VALIDATORS, Kind, RowProblem, Sample, enforce
from rlhfkit.data.sources import load_rows
from rlhfkit.errors import DataError

T = TypeVar("T")


def load_examples(
    spec: str,
    kind: Kind,
    transform: Callable[[Sample], T],
    *,
    split: str = "train",
    max_samples: int = 0,
    on_error: str = "error",
    max_errors_shown: int = 20,
) -> tuple[list[T], list[str]]:
    """Read `spec`, validate rows as `kind`, apply `transform` (e.g. tokenization) to each.

    Schema problems and transform problems (a prompt too long after tokenization, ...) are gathered
    together in file order, so one run lists everything wrong with the file. Returns
    (examples, skipped problems); raises DataError under on_error=error.
    """
    rows = load_rows(spec, split=split, max_samples=max_samples)
    if not rows:
        raise DataError(f"{spec}: no rows found")
    check = VALIDATORS[kind]
    examples: list[T] = []
    problems: list[str] = []
    ties = 0
    for row in rows:
        if kind == "preference" and row.data is not None and row.data.get("tie") is True:
            ties += 1  # an exported tie (rlhfkit label export --ties keep): no preferred answer to learn
            continue
        if row.error is not None:
            problems.append(f"{row.where}: {row.error}")
            continue
        try:
            examples.append(transform(check(row)))
        except RowProblem as exc:
            problems.append(f"{row.where}: {exc}")
    if ties:
        print(f"{spec}: {ties} tie row(s) (\"tie\": true) left out: pairwise training needs a preferred answer",
              file=sys.stderr, flush=True)
        if ties == len(rows):
            raise DataError(f"{spec}: every row is a tie (\"tie\": true); nothing to learn a preference from")
    skipped = enforce(problems, on_error=on_error, total=len(rows), max_shown=max_errors_shown, what=spec)
    return examples, skipped


def split_holdout(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministically hold out `fraction` of items (at least 1, and never all, when fraction > 0 and n >= 2)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    k = min(len(items) - 1, max(1, int(round(len(items) * fraction))))  # keep >= 1 for training
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
