"""distq.setup.schema: nested dicts to frozen dataclasses, every error naming its dotted field."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from distq.errors import DistqError
from distq.setup.schema import build, flatten, plain


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    steps: int = 10
    sizes: tuple[int, ...] = (1,)
    on: bool = False


@dataclass(frozen=True)
class Outer:
    name: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


def test_values_are_converted_to_the_field_types():
    built = build(Outer, {"inner": {"rate": "1e-3", "steps": 20.0, "sizes": 3, "on": True}}, "", "test field")
    assert built == Outer(inner=Inner(rate=0.001, steps=20, sizes=(3,), on=True))
    assert isinstance(built.inner.rate, float) and isinstance(built.inner.steps, int)


@pytest.mark.parametrize("values, words", [
    ({"inner": {"stesp": 3}}, ["unknown test field 'inner.stesp'", "did you mean 'inner.steps'"]),
    ({"inner": {"steps": 2.5}}, ["test field 'inner.steps'", "whole number"]),
    ({"inner": {"on": "yes"}}, ["test field 'inner.on'", "true or false"]),
    ({"inner": {"sizes": [1, "x"]}}, ["test field 'inner.sizes[1]'", "whole number"]),
    ({"inner": [1]}, ["test field 'inner'", "must be a mapping"]),
    ({"name": 3}, ["test field 'name'", "must be a string"]),
])
def test_errors_name_the_field(values, words):
    with pytest.raises(DistqError) as err:
        build(Outer, values, "", "test field")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_flatten_and_plain_give_dotted_paths_and_lists():
    assert flatten(plain({"inner": {"sizes": (1, 2)}, "name": None})) == {"inner.sizes": [1, 2], "name": None}
