"""shared.record: what the config and the protocol rely on from their records."""

from __future__ import annotations

from typing import ClassVar

import pytest

from shared.record import Factory, Record


class Point(Record):
    LIMIT: ClassVar[int] = 10
    x: int
    y: int = 0
    tags: list = Factory(list)


class Point3(Point):
    z: float = 1.5


def test_positional_keyword_and_defaults() -> None:
    assert Point(1, 2) == Point(x=1, y=2) == Point(1, y=2, tags=[])
    p = Point(5)
    assert (p.x, p.y, p.tags) == (5, 0, [])
    assert Point.LIMIT == 10 and "LIMIT" not in Point._fields


def test_a_factory_default_is_fresh_for_each_instance() -> None:
    a, b = Point(1), Point(1)
    a.tags.append("x")
    assert b.tags == []


def test_wrong_arguments_name_the_field() -> None:
    with pytest.raises(TypeError, match="missing field 'x'"):
        Point()
    with pytest.raises(TypeError, match="has no field 'w'"):
        Point(1, w=2)
    with pytest.raises(TypeError, match="multiple values for 'x'"):
        Point(1, x=2)
    with pytest.raises(TypeError, match="takes 3 arguments, got 4"):
        Point(1, 2, [], 4)


def test_frozen() -> None:
    p = Point(1)
    with pytest.raises(AttributeError, match="frozen Point"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y


def test_equality_hash_and_repr_follow_type_and_fields() -> None:
    assert Point(1, 2) != Point(1, 3)
    assert Point3(1, 2, [], 1.5) != Point(1, 2)  # another type is never equal
    assert hash(Point3(1, z=2.0, tags=())) == hash(Point3(1, 0, (), 2.0))  # type: ignore[arg-type]
    assert repr(Point3(1)) == "Point3(x=1, y=0, tags=[], z=1.5)"
    assert Point3._fields == ("x", "y", "tags", "z")


def test_a_required_field_after_an_inherited_default_is_refused() -> None:
    with pytest.raises(TypeError, match="needs one here too"):
        class Bad(Point):  # noqa: F841
            y: int
