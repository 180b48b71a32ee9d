"""The check of a dataclass's fields in plain Python, from the same Annotated metadata pydantic
applies (`Check(...)`, `After(...)`, `AWARE`): where the agent makes an event, a value the
cloud would refuse is refused there, without pydantic.

`@checked` on a dataclass makes its `__init__` check every field after setting it; pydantic,
which builds a validated instance without calling `__init__`, is not slowed by it. A field's
value is kept as given, except where pydantic keeps another value: an int in a float-only
field becomes that float, an After validator's result replaces the value (a time in UTC).

Unlike pydantic's default (lax) mode, nothing is coerced: a bool or a numeric string is no
number, a string no datetime, a dict no nested dataclass. So whatever this check accepts,
pydantic accepts as the same value; what pydantic refuses, this check refuses.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from common.checks import afters, constraints
from oee.bounds import AWARE

T = TypeVar("T")
_Checker = Callable[[Any], Any]  # the value to keep, or raises _Refused


class FieldValueError(ValueError):
    """A value a field of an event (or of its components) may not carry; the message names
    the class, the field and the reason."""


class _Refused(Exception):
    pass


# The original `__init__` of each checked class: for a caller that has already checked
# every value (oee.events.count_event).
_UNCHECKED: dict[type, Callable[..., None]] = {}
# Per class: (field name, its default or _NO_DEFAULT, its checker).
_FIELDS: dict[type, list[tuple[str, Any, _Checker]]] = {}
_NO_DEFAULT: Any = object()


def checked(cls: type[T]) -> type[T]:
    """Class decorator of a dataclass: its `__init__` checks the fields (FieldValueError)."""
    init: Callable[..., None] = cls.__init__
    _UNCHECKED[cls] = init

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        check_fields(self)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = init.__doc__
    setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses to assign a method)
    return cls


def build_unchecked(cls: type[T], **values: Any) -> T:
    """An instance of a checked class made without the check: the caller vouches for every
    value (each of its field's exact type and within its bounds)."""
    obj = cls.__new__(cls)
    setters = _SETTERS.get(cls)
    if setters is None:
        setters = _SETTERS[cls] = _slot_setters(cls)
    if len(values) == len(setters):
        try:
            for name, value in values.items():
                setters[name](obj, value)
            return obj
        except KeyError:
            obj = cls.__new__(cls)
    _UNCHECKED[cls](obj, **values)
    return obj


# Per slotted class, each field's slot setter: setting every field through them costs a
# third of the frozen dataclass's `__init__` (which goes through object.__setattr__).
_SETTERS: dict[type, dict[str, Callable[[Any, Any], None]]] = {}


def _slot_setters(cls: type) -> dict[str, Callable[[Any, Any], None]]:
    setters: dict[str, Callable[[Any, Any], None]] = {}
    for f in dataclasses.fields(cls):
        slot = next((k.__dict__[f.name] for k in cls.__mro__ if f.name in k.__dict__), None)
        if type(slot) is not types.MemberDescriptorType:
            return {}  # not slotted: the dataclass's own __init__
        setters[f.name] = slot.__set__
    return setters


def check_fields(obj: Any) -> None:
    """Check every field of a checked dataclass instance, normalising where pydantic would."""
    cls = type(obj)
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = _compile_fields(cls)
    for name, default, check in fields:
        value = getattr(obj, name)
        if value is default:
            continue  # a field's own default (None, 0, "good", ...) is in bounds
        try:
            kept = check(value)
        except _Refused as exc:
            raise FieldValueError(f"{cls.__name__}.{name}: {exc}") from None
        if kept is not value:
            object.__setattr__(obj, name, kept)


def _compile_fields(cls: type) -> list[tuple[str, Any, _Checker]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        check = _compile(hints[f.name])
        default = _NO_DEFAULT if f.default is dataclasses.MISSING else f.default
        if default is not _NO_DEFAULT:
            try:
                check(default)
            except _Refused as exc:
                raise TypeError(f"{cls.__name__}.{f.name}: default out of bounds") from exc
        out.append((f.name, default, check))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _compile(tp: Any) -> _Checker:
    """The checker of one annotated type."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metadata = get_args(tp)
        check = _compile_base(base, constraints(metadata), any(m is AWARE for m in metadata))
        for function in afters(metadata):
            check = _after(check, function)
        return check
    return _compile_base(tp, {}, False)


def _after(check: _Checker, function: Callable[[Any], Any]) -> _Checker:
    def run(value: Any) -> Any:
        value = check(value)
        try:
            return function(value)
        except ValueError as exc:
            raise _Refused(str(exc)) from None

    return run


def _compile_base(tp: Any, limits: dict[str, Any], aware: bool) -> _Checker:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        if limits or aware:
            raise TypeError(f"constraints on a union are not supported: {tp}")
        return _union([_compile(member) for member in get_args(tp)], get_args(tp))
    if origin is Literal:
        return _literal(get_args(tp))
    if origin is dict:
        key_type, value_type = get_args(tp)
        return _dict(_compile(key_type), _compile(value_type))
    unknown = set(limits) - _KNOWN.get(tp, set())
    if unknown:
        raise TypeError(f"constraints {sorted(unknown)} of {tp} are not supported")
    if tp is str:
        return _text(limits)
    if tp is int:
        return _integer(limits)
    if tp is float:
        return _real(limits)
    if tp is bool:
        return _exact(bool)
    if tp is datetime:
        return _datetime(aware)
    if tp is type(None):
        return _exact(type(None))
    if tp is Any:
        return _anything
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _instance(tp)
    raise TypeError(f"no plain check for {tp}")


_KNOWN: dict[Any, set[str]] = {
    str: {"min_length", "max_length", "pattern"},
    int: {"ge", "le", "gt", "lt"},
    float: {"ge", "le", "gt", "lt", "allow_inf_nan"},
}


def _bounds(limits: dict[str, Any]) -> Callable[[Any], None]:
    ge, le, gt, lt = (limits.get(k) for k in ("ge", "le", "gt", "lt"))

    def check(value: Any) -> None:
        if ge is not None and not value >= ge:
            raise _Refused(f"{_shown(value)} is not greater than or equal to {ge}")
        if le is not None and not value <= le:
            raise _Refused(f"{_shown(value)} is not less than or equal to {le}")
        if gt is not None and not value > gt:
            raise _Refused(f"{_shown(value)} is not greater than {gt}")
        if lt is not None and not value < lt:
            raise _Refused(f"{_shown(value)} is not less than {lt}")

    return check


def _integer(limits: dict[str, Any]) -> _Checker:
    bounds = _bounds(limits)
    if set(limits) == {"ge", "le"}:
        lo, hi = limits["ge"], limits["le"]

        def check(value: Any) -> Any:
            if type(value) is not int:
                raise _Refused(f"{_shown(value)} is not an integer")
            if not lo <= value <= hi:
                bounds(value)
            return value

        return check

    def check_any(value: Any) -> Any:
        if type(value) is not int:
            raise _Refused(f"{_shown(value)} is not an integer")
        bounds(value)
        return value

    return check_any


def _real(limits: dict[str, Any]) -> _Checker:
    bounds = _bounds(limits)
    finite = not limits.get("allow_inf_nan", True)

    def check(value: Any) -> Any:
        kind = type(value)
        if kind is not float:
            if kind is not int:
                raise _Refused(f"{_shown(value)} is not a number")
            try:
                value = float(value)
            except OverflowError:
                raise _Refused(f"{_shown(value)} is too large for a float") from None
        if finite and not math.isfinite(value):
            raise _Refused(f"{value!r} is not a finite number")
        bounds(value)
        return value

    return check


def _text(limits: dict[str, Any]) -> _Checker:
    least = limits.get("min_length", 0)
    most = limits.get("max_length")
    pattern = limits.get("pattern")
    # pydantic's patterns are Rust regexes searched in the string, where `$` is the end
    # of the text (in Python it also matches before a final newline).
    search = None
    if pattern is not None:
        if pattern.endswith("$") and not pattern.endswith("\\$"):
            pattern = pattern[:-1] + r"\Z"
        search = re.compile(pattern).search

    # Texts found good, per field type: an engine's ids, states and products repeat.
    good: set[str] = set()

    remember = most is not None and most <= _GOOD_TEXT_CHARS

    def check(value: Any) -> Any:
        if type(value) is str and value in good:
            return value
        refuse(value)
        if remember:
            if len(good) >= _GOOD_TEXTS_MAX:
                good.clear()
            good.add(value)
        return value

    def refuse(value: Any) -> None:
        if not isinstance(value, str):
            raise _Refused(f"{_shown(value)} is not a string")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused("text holds a lone surrogate") from None
        size = len(value)
        if size < least:
            raise _Refused(f"text shorter than {least} characters")
        if most is not None and size > most:
            raise _Refused(f"text longer than {most} characters")
        if search is not None and search(value) is None:
            if "\x00" in value:
                raise _Refused("text holds a NUL character")
            raise _Refused(f"text does not match {limits['pattern']!r}")

    return check


_GOOD_TEXTS_MAX = 256
_GOOD_TEXT_CHARS = 200  # ids, PLC texts, codes: not messages, not event ids


def _datetime(aware: bool) -> _Checker:
    def check(value: Any) -> Any:
        if not isinstance(value, datetime):
            raise _Refused(f"{_shown(value)} is not a datetime")
        if aware and value.utcoffset() is None:
            raise _Refused("a time without a UTC offset")
        return value

    return check


def _exact(kind: type) -> _Checker:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise _Refused(f"{_shown(value)} is not {kind.__name__}")
        return value

    return check


def _anything(value: Any) -> Any:
    return value


def _instance(cls: type) -> _Checker:
    def check(value: Any) -> Any:
        if not isinstance(value, cls):
            raise _Refused(f"{_shown(value)} is not {cls.__name__}")
        return value

    return check


def _literal(choices: tuple[Any, ...]) -> _Checker:
    allowed = frozenset(choices)
    kinds = {type(c) for c in choices}

    def check(value: Any) -> Any:
        if type(value) not in kinds or value not in allowed:
            raise _Refused(f"{_shown(value)} is not one of {', '.join(map(repr, choices))}")
        return value

    return check


def _dict(check_key: _Checker, check_value: _Checker) -> _Checker:
    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise _Refused(f"{_shown(value)} is not a dict")
        out = {}
        same = True
        for key, item in value.items():
            kept_key, kept = check_key(key), check_value(item)
            same = same and kept_key is key and kept is item
            out[kept_key] = kept
        return value if same else out

    return check


def _base_types(tp: Any) -> tuple[type, ...]:
    """The Python types a union member takes as they are (pydantic's exact match)."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is Literal:
        return tuple({type(c) for c in get_args(tp)})
    if get_origin(tp) is dict:
        return (dict,)
    if tp is Any:
        return (object,)
    return (tp,) if isinstance(tp, type) else ()


def _union(members: list[_Checker], member_types: tuple[Any, ...]) -> _Checker:
    """pydantic's smart union, without coercion: the members that take the value's type as
    it is, in order, then (for an int) the float members, which keep it as a float."""
    bases = [_base_types(t) for t in member_types]
    if len(members) == 2 and bases[1] == (type(None),) and float not in bases[0]:
        inner = members[0]  # `X | None`: no choice to make

        def optional(value: Any) -> Any:
            return value if value is None else inner(value)

        return optional
    table: dict[type, list[_Checker]] = {}

    def candidates(kind: type) -> list[_Checker]:
        found = table.get(kind)
        if found is None:
            exact = [m for m, b in zip(members, bases, strict=True) if kind in b]
            wider = [
                m
                for m, b in zip(members, bases, strict=True)
                if m not in exact and any(issubclass(kind, x) for x in b)
            ]
            floats = [
                m
                for m, b in zip(members, bases, strict=True)
                if kind is int and float in b and m not in exact
            ]
            found = table[kind] = exact + wider + floats
        return found

    def check(value: Any) -> Any:
        reasons = []
        for member in candidates(type(value)):
            try:
                return member(value)
            except _Refused as exc:
                reasons.append(str(exc))
        raise _Refused("; ".join(reasons) or f"{_shown(value)} is of no type of the union")

    return check


__all__ = ["FieldValueError", "build_unchecked", "check_fields", "checked"]
