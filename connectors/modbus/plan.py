"""Read planning: coalesce the spans that tags want into as few Modbus reads as allowed.

Owns the rule for which tags share one request and how each tag's values are cut back out
of that request's response. Does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from connectors.modbus.codec import BIT_TABLES, TABLES

T = TypeVar("T")

# Protocol limits of one read (function codes 1/2: 2000 bits, 3/4: 125 registers).
MAX_REGISTERS = 125
MAX_BITS = 2000


class PlanError(ValueError):
    """A span or limit that cannot be planned (bad span, tag larger than one read, ...)."""


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """The span one tag wants: `count` registers (or bits) from `address` of `table`."""

    unit: int
    table: str
    address: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.unit <= 255:
            raise PlanError(f"unit must be in 0..255, got {self.unit}")
        if self.table not in TABLES:
            raise PlanError(f"unknown table {self.table!r}; expected one of {', '.join(TABLES)}")
        if self.count < 1 or self.address < 0 or self.address + self.count > 0x10000:
            raise PlanError(f"span {self.address}+{self.count} is outside 0..65535")

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class TagSpan:
    """A tag's key (unique across the plan) and the span it wants."""

    key: str
    request: ReadRequest


class Member(NamedTuple):
    """Where one tag's values sit inside its block's response."""

    key: str
    offset: int
    size: int  # not `count`: that would shadow tuple.count


@dataclass(frozen=True, slots=True)
class Block:
    """One read request and the tags it serves, ordered by (offset, key)."""

    unit: int
    table: str
    start: int
    count: int
    members: tuple[Member, ...]

    def slice(self, values: Sequence[T], key: str) -> list[T]:
        """The part of this block's response `values` that belongs to tag `key`."""
        # Coil/discrete responses are padded to whole bytes, so extra trailing values are fine.
        if len(values) < self.count:
            raise PlanError(f"response has {len(values)} values, block reads {self.count}")
        for member in self.members:
            if member.key == key:
                return list(values[member.offset : member.offset + member.size])
        raise KeyError(key)


def plan_reads(
    tags: Sequence[TagSpan],
    *,
    max_gap: int = 10,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
) -> list[Block]:
    """Merge spans of the same unit and table whose gap is <= `max_gap` into shared reads.

    Greedy over spans sorted by address: a span joins the open block when the gap to it is
    small enough and the block stays within the table's limit, else it opens a new block.
    Overlapping spans (e.g. bits of one register) share a block. A tag is never split; one
    longer than the limit is an error. Blocks come sorted by (unit, table, start).
    """
    if max_gap < 0:
        raise PlanError(f"max_gap must be >= 0, got {max_gap}")
    if not 1 <= max_registers <= MAX_REGISTERS:
        raise PlanError(f"max_registers must be in 1..{MAX_REGISTERS}, got {max_registers}")
    if not 1 <= max_bits <= MAX_BITS:
        raise PlanError(f"max_bits must be in 1..{MAX_BITS}, got {max_bits}")

    groups: dict[tuple[int, str], list[TagSpan]] = {}
    seen: set[str] = set()
    for tag in tags:
        if tag.key in seen:
            raise PlanError(f"duplicate tag key {tag.key!r}")
        seen.add(tag.key)
        groups.setdefault((tag.request.unit, tag.request.table), []).append(tag)

    blocks: list[Block] = []
    for (unit, table), spans in sorted(groups.items()):
        limit = max_bits if table in BIT_TABLES else max_registers
        current: list[TagSpan] = []
        start = end = 0
        for tag in sorted(spans, key=lambda t: (t.request.address, t.request.count, t.key)):
            req = tag.request
            if req.count > limit:
                raise PlanError(
                    f"tag {tag.key!r} spans {req.count} {table} items, more than one read ({limit})"
                )
            if current and req.address - end <= max_gap and max(end, req.end) - start <= limit:
                current.append(tag)
                end = max(end, req.end)
                continue
            if current:
                blocks.append(_block(unit, table, start, end, current))
            current, start, end = [tag], req.address, req.end
        if current:
            blocks.append(_block(unit, table, start, end, current))
    return blocks


def _block(unit: int, table: str, start: int, end: int, tags: list[TagSpan]) -> Block:
    members = (Member(t.key, t.request.address - start, t.request.count) for t in tags)
    return Block(
        unit, table, start, end - start, tuple(sorted(members, key=lambda m: (m.offset, m.key)))
    )
