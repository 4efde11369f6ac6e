"""Shared fixtures. Models and tokenizers come from the bundled package (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
pytest_plugins = ["tests.label_services", "tests.label_server"]  # PostgreSQL and Chromium fixtures (see that module)


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled SmolLM2 tokenizer (chat template included), as used by tiny:* models."""
    from rlhfkit.models.load import load_tokenizer

    return load_tokenizer("tiny:llama")


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written verbatim) one per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path
