"""Typed configs: one dataclass per command, loaded from YAML and `key=value` overrides.

Every field is declared with `opt(default, help, ...)` so that `--print-config` can show the default and
a one-line help for it, and so that range checks live next to the field they guard. Nested sections are
dataclasses themselves and are addressed with dotted keys (`train.lr=1e-4`).

Errors name the key, the expected value and where it came from (file or command line); unknown keys
suggest the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from rlhfkit.errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def opt(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """Declare a config field with its default, a one-line help and optional numeric bounds."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """Declare a nested config section (a dataclass with its own fields)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return dataclasses.replace(value)


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from an optional YAML file and `key=value` overrides; validate every field."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError("--config", f"{path} is not valid UTF-8") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        raw = loaded
        _mark_sources(raw, "", str(path), sources)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "command-line overrides must look like key=value (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-")
        _set_dotted(raw, key, _CliValue(value), cls)
        sources[key] = "command line"
    cfg = _build(cls, raw, "", sources)
    _validate(cfg, "", sources)
    return cfg


class _CliValue(str):
    """A raw string from the command line, parsed according to the target field's type."""


def _mark_sources(raw: dict[str, Any], prefix: str, source: str, out: dict[str, str]) -> None:
    for key, value in raw.items():
        full = f"{prefix}{key}"
        out[full] = source
        if isinstance(value, dict):
            _mark_sources(value, full + ".", source, out)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, sources: dict[str, str]) -> Any:
    if not isinstance(raw, dict):
        key = prefix.rstrip(".")
        raise ConfigError(key, f"expected a section (mapping of keys), got {raw!r}", sources.get(key))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = prefix + str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(full, f"unknown key{hint} (known keys here: {known})", sources.get(full))
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        full = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            section_cfg = _build(tp, raw[name], full + ".", sources)
            default = _field_default(fields[name])
            if default is not None:  # the parent's own defaults for this section (e.g. PPO's train.lr)
                given = raw[name] if isinstance(raw[name], dict) else {}
                section_cfg = dataclasses.replace(default, **{k: getattr(section_cfg, k) for k in given})
            kwargs[name] = section_cfg
        else:
            kwargs[name] = _coerce(raw[name], tp, full, sources.get(full))
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        inner = _type_name(get_args(tp)[0]).removeprefix("a ").removeprefix("an ")
        return f"a list of {inner}s"
    if tp is type(None):
        return "null"
    if tp is dict or origin is dict:
        return "a mapping, e.g. {key: value}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check `value` against the annotation `tp`; parse command-line strings by the expected type."""
    origin = get_origin(tp)
    fail = ConfigError(key, f"expected {_type_name(tp)}, got {str(value)!r}", source)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, _CliValue) and value.lower() in ("null", "none", ""))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise fail
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, _CliValue):
            value = str(value)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}{hint}", source)
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, _CliValue):
            text = str(value).strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise fail from None
                value = [_CliValue(str(v)) for v in value]
            else:
                value = [_CliValue(v.strip()) for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, _CliValue):
            low = value.lower()
            if low in ("true", "yes", "1", "on"):
                return True
            if low in ("false", "no", "0", "off"):
                return False
            raise fail
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, _CliValue):
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                raise fail from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail
    if tp is float:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, (int, float)):
            return _finite(float(value), fail)
        if isinstance(value, str):  # YAML reads "1e-4" as a string; accept any float literal
            try:
                out = float(value)
            except ValueError:
                raise fail from None
            return _finite(out, fail)
        raise fail
    if tp is str:
        if isinstance(value, _CliValue):
            return str(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail
    if tp is dict or origin is dict:
        if isinstance(value, _CliValue) and str(value).strip().startswith("{"):  # key={a: 1, b: x}
            try:
                value = yaml.safe_load(str(value))
            except yaml.YAMLError:
                raise fail from None
        if isinstance(value, dict):
            return value
        raise fail
    if tp is Any:
        return value
    raise ConfigError(key, f"unsupported field type {tp}", source)


def _finite(value: float, fail: ConfigError) -> float:
    if not math.isfinite(value):
        raise fail
    return value


def _validate(cfg: Any, prefix: str, sources: dict[str, str]) -> None:
    """Apply declared bounds, then each section's own `validate()` for cross-field rules."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        full = prefix + f.name
        if dataclasses.is_dataclass(value):
            _validate(value, full + ".", sources)
            continue
        meta = f.metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for bound, ok, words in (
                ("ge", lambda v, b: v >= b, ">="),
                ("gt", lambda v, b: v > b, ">"),
                ("le", lambda v, b: v <= b, "<="),
                ("lt", lambda v, b: v < b, "<"),
            ):
                b = meta.get(bound)
                if b is not None and not ok(value, b):
                    raise ConfigError(full, f"expected a value {words} {b}, got {value}", sources.get(full))
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as exc:
            # Sections raise with their local key; re-raise with the full dotted key and its source.
            full = prefix + exc.key
            raise ConfigError(full, exc.reason, exc.source or sources.get(full)) from None


# --------------------------------------------------------------------------------------------------
# Output


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what is saved into the run folder)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def describe(cls_or_cfg: Any, indent: int = 0) -> str:
    """YAML with a `# help` comment above every key: what `--print-config` prints."""
    cfg = cls_or_cfg() if isinstance(cls_or_cfg, type) else cls_or_cfg
    hints = typing.get_type_hints(type(cfg))
    pad = "  " * indent
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}# {help_text}")
            lines.append(f"{pad}{f.name}:")
            lines.append(describe(value, indent + 1))
            continue
        tp = _type_name(hints[f.name])
        lines.append(f"{pad}# {help_text} [{tp}]")
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
        if dumped.startswith("{") and dumped.endswith("}"):
            dumped = dumped[1:-1]
        lines.append(f"{pad}{dumped}")
    return "\n".join(lines)
