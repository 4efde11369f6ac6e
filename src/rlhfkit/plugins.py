"""Loading the user's code named as `module:attribute` in a config (a teacher, a judge, an env factory)."""

from __future__ import annotations

import importlib
from typing import Any

from rlhfkit.errors import ConfigError


def load_object(spec: str, field: str) -> Any:
    """The object `module:attribute` names (dotted attributes allowed); errors name the config field."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(field, f"expected module:function, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # not installed, or the module's own code failed while importing
        raise ConfigError(field, f"cannot load {spec!r}: importing module {module_name!r} failed "
                                 f"({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(field, f"cannot load {spec!r}: module {module_name!r} has no function {attr!r}")
        obj = getattr(obj, part)
    return obj
