"""Constraints and validators of plain dataclasses, which pydantic applies when it validates.

The agent's configuration, events and wire messages are stdlib dataclasses. Where untrusted
input enters (the YAML file, a pushed configuration, a batch at ingest), pydantic validates
it into them (`pydantic.TypeAdapter(SomeDataclass)`); the running agent only builds and reads
them, and does not import pydantic at all (README "Footprint": pydantic and the models it
builds are about 13 MB of the agent's memory).

The metadata here is what the dataclasses' `Annotated[...]` fields carry. Each object is
turned into its pydantic form (`pydantic.Field(...)`, `BeforeValidator`, `AfterValidator`)
only when pydantic builds a schema, so importing a module of dataclasses imports no pydantic:

    port: Annotated[int, Check(ge=1, le=65535)] = 1883
    interval: Annotated[float, Before(parse_duration)] = 60.0

`FORBID` as a dataclass's `__pydantic_config__` refuses unknown keys, as
`ConfigDict(extra="forbid")` does on a model. `validate(Kind, data)` is that validation
(pydantic imported and its validator built at the first call), `validated(Kind, **fields)`
the same from keywords, and `jsonable` gives a dataclass's JSON values as pydantic's
`mode="json"` did. `constraints` and `afters` read the metadata back for the plain check of
events (oee.checking).
"""

from __future__ import annotations

import dataclasses
from datetime import date, time
from functools import cache
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

if TYPE_CHECKING:
    from pydantic import TypeAdapter

T = TypeVar("T")

# A dataclass's `__pydantic_config__`: unknown keys are refused (the TypedDict ConfigDict is
# a plain dict at run time; spelling it as one keeps pydantic out of the import).
FORBID: Final[dict[str, Any]] = {"extra": "forbid"}


class _Deferred:
    """Annotated metadata standing for `pydantic.<kind>(*args, **kwargs)`."""

    __slots__ = ("args", "kind", "kwargs")

    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        self.kind = kind
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.kind}({', '.join(parts)})"

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        import pydantic

        made = getattr(pydantic, self.kind)(*self.args, **self.kwargs)
        return handler(Annotated[source, made])


def Check(**constraints: Any) -> Any:
    """The constraints of `pydantic.Field` (ge, le, gt, min_length, max_length, pattern,
    allow_inf_nan, discriminator, ...), applied to the annotated type."""
    return _Deferred("Field", **constraints)


def Before(function: Any) -> Any:
    """`pydantic.BeforeValidator(function)`: runs on the raw input, before the type's check."""
    return _Deferred("BeforeValidator", function)


def After(function: Any) -> Any:
    """`pydantic.AfterValidator(function)`: runs on the value the type's check gave."""
    return _Deferred("AfterValidator", function)


def constraints(metadata: Any) -> dict[str, Any]:
    """The `Check(...)` constraints among a field's Annotated metadata, merged (outer wins)."""
    out: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, _Deferred) and item.kind == "Field":
            out.update(item.kwargs)
    return out


def afters(metadata: Any) -> list[Any]:
    """The functions of the `After(...)` validators among a field's Annotated metadata, in
    the order pydantic runs them."""
    return [
        item.args[0]
        for item in metadata
        if isinstance(item, _Deferred) and item.kind == "AfterValidator"
    ]


@cache
def adapter(kind: Any) -> TypeAdapter[Any]:
    """pydantic's validator of `kind` (a dataclass, or a type such as list[X]), built once."""
    from pydantic import TypeAdapter

    return TypeAdapter(kind)


def validate(kind: type[T], data: Any, **options: Any) -> T:
    """`data` (a mapping as read from YAML or JSON) validated into `kind`; raises
    pydantic.ValidationError. `options` go to `validate_python` (e.g. `context`)."""
    checker: Any = kind
    result: T = adapter(checker).validate_python(data, **options)
    return result


def validated(kind: type[T], /, **fields: Any) -> T:
    """`kind(**fields)` with every field validated (and converted) as from a file."""
    return validate(kind, fields)


def jsonable(value: Any) -> Any:
    """A dataclass (and what it holds) as JSON values, as pydantic's `mode="json"` dumps them:
    times and dates in ISO 8601, paths as text, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, time | date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    return value


__all__ = [
    "FORBID",
    "After",
    "Before",
    "Check",
    "adapter",
    "afters",
    "constraints",
    "jsonable",
    "validate",
    "validated",
]
