"""Frozen records: typed fields with defaults, keyword or positional construction,
``==``, ``hash`` and ``repr``, for the config sections and the protocol messages.

Why not dataclasses: ``@dataclass`` writes and ``exec``s Python source for every
class (about 1 ms each here) and imports ``inspect``. The 20 classes of
shared/config.py and shared/protocol.py cost ``anime-status`` ~30 ms of a
whole-process budget of 100 ms. A Record reads its annotations once, when the
class is created, and shares one ``__init__``.

    class Point(Record):
        x: int
        y: int = 0
        tags: list = Factory(list)   # a fresh list per instance
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, dataclass_transform


class Factory:
    """A default made anew for every instance (like dataclasses' default_factory)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


class FrozenError(AttributeError):
    pass


@dataclass_transform(frozen_default=True, field_specifiers=(Factory,))
class Record:
    """Base class; subclasses declare fields as annotations, defaults as values."""

    _fields: ClassVar[tuple[str, ...]] = ()  # in declaration order, inherited ones first
    _field_types: ClassVar[dict[str, str]] = {}  # name -> annotation as written
    _field_defaults: ClassVar[dict[str, Any]] = {}  # only the fields that have one

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        types = dict(cls._field_types)
        defaults = dict(cls._field_defaults)
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            annotation = str(annotation)
            if annotation.startswith(("ClassVar", "typing.ClassVar")):
                continue
            types[name] = annotation
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
                delattr(cls, name)  # the instance always holds the value
            elif name in defaults:
                raise TypeError(f"{cls.__name__}.{name}: a field with a default in a base "
                                "class needs one here too")
        cls._fields = tuple(types)
        cls._field_types = types
        cls._field_defaults = defaults

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} arguments, "
                            f"got {len(args)}")
        values = dict(zip(fields, args))
        for name, value in kwargs.items():
            if name in values or name not in self._field_types:
                what = "got multiple values for" if name in values else "has no field"
                raise TypeError(f"{type(self).__name__}() {what} {name!r}")
            values[name] = value
        if len(values) < len(fields):
            self._fill_defaults(values)
        object.__setattr__(self, "__dict__", values)

    def _fill_defaults(self, values: dict[str, Any]) -> None:
        for name in self._fields:
            if name in values:
                continue
            try:
                default = self._field_defaults[name]
            except KeyError:
                raise TypeError(f"{type(self).__name__}() missing field {name!r}") from None
            values[name] = default.make() if isinstance(default, Factory) else default

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise FrozenError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.__dict__[name] for name in self._fields)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={self.__dict__[name]!r}" for name in self._fields)
        return f"{type(self).__name__}({inner})"

    def as_dict(self) -> dict[str, Any]:
        """The fields as a new dict (shallow: values are not copied)."""
        return dict(self.__dict__)
