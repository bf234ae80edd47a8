"""Nested dicts (the YAML layout) to frozen dataclasses and back, shared by training configs (distq.setup.config) and
sweep files (distq.edges.sweep): every type error and unknown key names its dotted field, with a "did you mean"."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from distq.errors import DistqError


def fail(kind: str, name: str, message: str) -> DistqError:
    """The error for field `name` of a `kind` ("config field", "sweep field")."""
    return DistqError(f"{kind} '{name}' {message}")


def unknown(key: str, allowed: tuple[str, ...], where: str) -> DistqError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return DistqError(f"unknown {where} '{key}'{hint} (allowed: {', '.join(allowed)})")


def yaml_number(text: str) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number everyone means."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def base_type(hint: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def coerce(value: Any, hint: Any, name: str, kind: str) -> Any:
    """Check `value` against a field's type hint, converting lists to tuples and ints to floats."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        listed = [a for a in options if typing.get_origin(a) is tuple]
        return coerce(value, listed[0] if listed and isinstance(value, (list, tuple)) else options[0], name, kind)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise fail(kind, name, f"must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(coerce(v, item, f"{name}[{i}]", kind) for i, v in enumerate(value))
    if isinstance(value, str) and hint in (float, int):
        value = yaml_number(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise fail(kind, name, f"must be true or false, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise fail(kind, name, f"must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail(kind, name, f"must be a whole number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise fail(kind, name, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint} for {name}")


def build(cls: type, values: Any, prefix: str, kind: str) -> Any:
    """An instance of dataclass `cls` (nested dataclass fields built from nested dicts) from `values`, the fields of
    section `prefix` ("" at the top); its __post_init__ validates the values."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise fail(kind, prefix or "the top level", f"must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise unknown(path, tuple(f"{prefix}.{n}" if prefix else n for n in names), kind)
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], value, path, kind)
        else:
            kwargs[key] = coerce(value, hints[key], path, kind)
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """Nested dicts with lists instead of tuples, ready for YAML."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted path: value}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat
