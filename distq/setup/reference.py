"""docs/configuration.md, generated from the config dataclasses: every dotted key with its type, default and the
attribute docstring written under the field in distq/setup/config.py (the one place a key is documented).

    python -m distq.setup.reference > docs/configuration.md

tests/test_reference.py fails when the file in docs/ is not what this module writes from the current classes.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import typing

from distq.setup import config as config_module
from distq.setup.config import RUN_SECTIONS, RUN_SETTING, Config

HEADER = """# Configuration reference

Generated from the field docs of `distq/setup/config.py` by `python -m distq.setup.reference > docs/configuration.md`; a test
fails when this file is stale. A YAML config maps 1:1 onto these sections; `--set section.key=value` overrides one
key on the command line (later flags win), and a sweep's `search_space` and `overrides` use the same dotted keys.
Lists are written `[a,b]` on the command line. Keys marked *run setting* only say how to run an experiment (how
long, where, how often to log and evaluate); `--resume` accepts changes to them and to nothing else.
"""


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring} of a dataclass: the string literal right under each annotated field."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for statement, next_statement in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(next_statement, ast.Expr) and isinstance(next_statement.value, ast.Constant)
                and isinstance(next_statement.value.value, str)):
            docs[statement.target.id] = inspect.cleandoc(next_statement.value.value)
    return docs


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else repr(value).replace("'", "")


def _type(annotation: str) -> str:
    """`Optional[tuple[float, ...]]` as `list of float`: what a YAML file holds (null is in the default column)."""
    annotation = re.sub(r"Optional\[(.*)\]$", r"\1", annotation)
    return re.sub(r"tuple\[(\w+), \.\.\.\]", r"list of \1", annotation).replace(" | ", " or ")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = [HEADER]
    top = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config, vars(config_module))
    plain = [name for name in top if not dataclasses.is_dataclass(hints[name])]
    sections = [name for name in top if dataclasses.is_dataclass(hints[name])]
    lines += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    docs = field_docs(Config)
    lines += [f"| `{name}` | {_type(str(top[name].type))} | `{_default(top[name])}` | {_cell(docs.get(name, ''))} |"
              for name in plain]
    for section in sections:
        cls = hints[section]
        docs = field_docs(cls)
        whole = section in RUN_SECTIONS
        note = " Every key of this section is a *run setting*." if whole else ""
        lines += ["", f"## `{section}`", "", _cell(inspect.cleandoc(cls.__doc__ or "")) + note, "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            marked = "*Run setting.* " if field.metadata.get(RUN_SETTING) and not whole else ""
            lines.append(f"| `{section}.{field.name}` | {_type(str(field.type))} | `{_default(field)}` | "
                         f"{marked}{_cell(docs.get(field.name, ''))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
