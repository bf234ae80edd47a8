"""distq.setup.reference: docs/configuration.md is what the config classes' field docs generate; every key has one."""
import dataclasses
import typing
from pathlib import Path

from distq.setup import config as config_module
from distq.setup.config import Config
from distq.setup.reference import field_docs, render

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_reference_is_current():
    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: python -m distq.setup.reference > docs/configuration.md")


def test_every_config_key_has_a_field_doc():
    hints = typing.get_type_hints(Config, vars(config_module))
    for cls in [Config, *(hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name]))]:
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            assert docs.get(field.name) or dataclasses.is_dataclass(hints.get(field.name)), (
                f"{cls.__name__}.{field.name} has no docstring under it in distq/setup/config.py")
