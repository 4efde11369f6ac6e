"""Errors meant for people: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class RlhfkitError(Exception):
    """A problem the user can fix (bad config, bad data, missing model). Exit code 2."""

    exit_code = 2


class ConfigError(RlhfkitError):
    """A config key is unknown, has the wrong type, or an impossible value."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key '{key}': {message}")
        self.key = key
        self.reason = message
        self.source = source


class DataError(RlhfkitError):
    """One or more data rows are invalid; the message lists them as `file:line: ...`."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class ModelError(RlhfkitError):
    """A model spec cannot be resolved or loaded."""
