"""Preference feedback: simulated annotators and candidate pairs -> a `preference` JSONL file.

A human-labeled file with the same `prompt` / `chosen` / `rejected` fields drops into the same place.
"""

from __future__ import annotations

from rlhfkit.feedback.annotators import (
    BUILTINS,
    Annotator,
    ScoreAnnotator,
    length_scores,
    load_annotator,
    sentiment_scores,
)
from rlhfkit.feedback.pairs import (
    Candidates,
    LabelStats,
    generate_pairs,
    label_pairs,
    load_prompts,
    simulate_feedback,
    write_preferences,
)

__all__ = [
    "BUILTINS",
    "Annotator",
    "Candidates",
    "LabelStats",
    "ScoreAnnotator",
    "generate_pairs",
    "label_pairs",
    "length_scores",
    "load_annotator",
    "load_prompts",
    "sentiment_scores",
    "simulate_feedback",
    "write_preferences",
]
