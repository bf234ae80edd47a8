"""Config files and overrides: YAML files that map 1:1 onto distq.setup.config's dataclasses, and `--set section.key=value`
overrides applied to them before validation. Every error names the file or the override."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from distq.errors import DistqError
from distq.setup.config import Config, config_from_dict


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line diagnostic as one line: the problem and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value parsed as YAML)."""
    if "=" not in text:
        raise DistqError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise DistqError(f"override {text!r}: value is not valid YAML ({_yaml_problem(err)})") from None
    return path.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested dict with each `section.key=value` applied."""
    values = copy.deepcopy(values)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise DistqError(f"override {text!r}: '{key}' is not a config section")
            node = child
        node[keys[-1]] = value
    return values


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DistqError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DistqError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DistqError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config file, apply overrides, validate."""
    return config_from_dict(apply_overrides(read_yaml(path), list(overrides)))
