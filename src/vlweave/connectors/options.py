"""Typed connector options: one frozen dataclass per connector family, parsed from ``connector.options``.

A family declares its options as a dataclass whose fields carry type annotations and defaults (``pool: int = 1``);
:func:`parse_options` turns the plain dict of a run config / ``config.json`` into an instance, and refuses

- an unknown key: ``unknown option(s) ['poool']; allowed: ['efficient_grid', 'input_norm', 'pool', 'standardize']``;
- a value of the wrong type (no silent ``int("2")`` or ``bool("yes")``):
  ``option 'pool' must be int, got '2' (str); allowed options: [...]``;
- a value outside a field's range (``field(metadata={"min": 1})``): ``option 'alpha' must be >= 1, got 0``.

Supported annotations: ``bool``, ``int`` (a bool is not an int here), ``float`` (an int is accepted), ``str``,
``None``, ``Literal[...]``, unions (``int | None``), ``tuple[X, ...]`` / ``tuple[X, Y]`` / ``list[X]`` (YAML and JSON
give lists; tuples are stored, so the instance stays hashable) and ``Any``.

Families compose by inheritance: a connector made of a fusion and a projector has an options class deriving from
both parts' classes (``DenseOptions(ProjectorHeadOptions, DenseFusionOptions)``), and each part reads only its own
fields, so an instance of the connector's class can be handed to :func:`vlweave.connectors.fusion.build_fusion`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_NO_MATCH = object()


class OptionsError(ValueError):
    """A connector option that cannot be used; ``key`` is the offending option (None when several are)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def option_names(cls: type) -> frozenset[str]:
    """The keys an options dataclass accepts."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def option_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of an options dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_options(cls: type[T], options: "Mapping[str, Any] | T | None") -> T:
    """An instance of the options dataclass ``cls`` from a plain mapping (or a checked instance, returned as is)."""
    if isinstance(options, cls):
        check_options(options)
        return options
    if options is not None and not isinstance(options, Mapping):
        raise OptionsError(f"options must be a mapping of option name -> value, got {type(options).__name__}")
    given = dict(options or {})
    allowed = sorted(option_names(cls))
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise OptionsError(f"unknown option(s) {unknown}; allowed: {allowed}",
                           key=unknown[0] if len(unknown) == 1 else None)
    types_ = option_types(cls)
    values = {}
    for key, value in given.items():
        converted = coerce(value, types_[key])
        if converted is _NO_MATCH:
            raise OptionsError(
                f"option {key!r} must be {describe_type(types_[key])}, got {value!r} ({type(value).__name__}); "
                f"allowed options: {allowed}", key=key)
        values[key] = converted
    out = cls(**values)
    check_options(out)
    return out


def check_options(obj: Any) -> None:
    """Check an options instance's field values against their types and ``min`` metadata."""
    types_ = option_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if coerce(value, types_[f.name]) is _NO_MATCH:
            raise OptionsError(f"option {f.name!r} must be {describe_type(types_[f.name])}, got {value!r} "
                               f"({type(value).__name__})", key=f.name)
        low = f.metadata.get("min")
        if low is not None and value is not None and value < low:
            raise OptionsError(f"option {f.name!r} must be >= {low}, got {value!r}", key=f.name)


def value_matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is acceptable for the annotation ``tp`` (what :func:`parse_options` would take)."""
    return coerce(value, tp) is not _NO_MATCH


def coerce(value: Any, tp: Any) -> Any:
    """``value`` in the stored form for ``tp`` (lists -> tuples where a tuple is declared, int -> float for a float
    field), or the private ``_NO_MATCH`` sentinel.  Never converts between str, bool and numbers."""
    if tp is Any:
        return value
    if tp is None or tp is type(None):
        return None if value is None else _NO_MATCH
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        for arg in args:
            out = coerce(value, arg)
            if out is not _NO_MATCH:
                return out
        return _NO_MATCH
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _NO_MATCH
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NO_MATCH
    if tp is str:
        return value if isinstance(value, str) else _NO_MATCH
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return _NO_MATCH
            items = [coerce(v, a) for v, a in zip(value, args)]
        else:
            inner = args[0] if args else Any
            items = [coerce(v, inner) for v in value]
        if any(i is _NO_MATCH for i in items):
            return _NO_MATCH
        return tuple(items) if origin is tuple else list(items)
    raise TypeError(f"options: unsupported annotation {tp!r} (use bool, int, float, str, Literal, unions, "
                    f"tuple or list of those)")


def describe_type(tp: Any) -> str:
    """A short human description of an annotation: ``int``, ``bool (true/false)``, ``one of '1d', '2d'``,
    ``list[int]``, ``int or null``."""
    if tp is Any:
        return "anything"
    if tp is None or tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is bool:
        return "bool (true/false)"
    if tp in (int, float, str):
        return tp.__name__
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return "[" + ", ".join(describe_type(a) for a in args) + "]"
        return f"list[{describe_type(args[0]) if args else 'anything'}]"
    return repr(tp)
