"""Read planning: which tags share a Modbus read, limits, and slicing responses back."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.modbus.codec import BIT_TABLES, decode_registers, encode_value
from connectors.modbus.plan import Block, Member, PlanError, ReadRequest, TagSpan, plan_reads


def span(key: str, address: int, count: int = 1, table: str = "holding", unit: int = 1) -> TagSpan:
    return TagSpan(key, ReadRequest(unit, table, address, count))


def test_contiguous_tags_make_one_block() -> None:
    tags = [span("speed", 0, 2), span("count", 2, 2), span("state", 4)]
    assert plan_reads(tags) == [
        Block(
            1,
            "holding",
            0,
            5,
            (Member("speed", 0, 2), Member("count", 2, 2), Member("state", 4, 1)),
        )
    ]


def test_gap_within_max_gap_merges_and_beyond_splits() -> None:
    merged = plan_reads([span("a", 0), span("b", 11)], max_gap=10)  # 10 unread registers
    assert [(b.start, b.count) for b in merged] == [(0, 12)]
    split = plan_reads([span("a", 0), span("b", 12)], max_gap=10)  # 11 unread registers
    assert [(b.start, b.count) for b in split] == [(0, 1), (12, 1)]
    assert len(plan_reads([span("a", 0), span("b", 2)], max_gap=0)) == 2
    assert len(plan_reads([span("a", 0), span("b", 1)], max_gap=0)) == 1


def test_200_adjacent_uint16_make_two_blocks() -> None:
    blocks = plan_reads([span(f"t{i:03}", i) for i in range(200)])
    assert [(b.start, b.count) for b in blocks] == [(0, 125), (125, 75)]
    assert len(blocks[0].members) + len(blocks[1].members) == 200


def test_coils_use_the_bit_limit() -> None:
    blocks = plan_reads([span(f"c{i}", i, table="coil") for i in range(2500)])
    assert [(b.start, b.count) for b in blocks] == [(0, 2000), (2000, 500)]
    far = [span("c", 0, 1, "coil"), span("d", 1999, 1, "coil")]
    assert [(b.start, b.count) for b in plan_reads(far, max_gap=2000)] == [(0, 2000)]
    farther = [span("c", 0, 1, "coil"), span("d", 2000, 1, "coil")]
    assert [(b.start, b.count) for b in plan_reads(farther, max_gap=2000)] == [(0, 1), (2000, 1)]


def test_different_units_and_tables_never_merge() -> None:
    tags = [
        span("h1", 0, unit=1),
        span("h2", 1, unit=2),
        span("i1", 1, table="input"),
        span("c1", 1, table="coil"),
        span("d1", 1, table="discrete"),
    ]
    blocks = plan_reads(list(reversed(tags)))
    assert [(b.unit, b.table, b.start) for b in blocks] == [
        (1, "coil", 1),
        (1, "discrete", 1),
        (1, "holding", 0),
        (1, "input", 1),
        (2, "holding", 1),
    ]
    assert all(len(b.members) == 1 for b in blocks)


def test_float32_at_block_boundary_is_not_split() -> None:
    tags = [span(f"u{i}", i) for i in range(124)] + [span("f", 124, 2)]
    blocks = plan_reads(tags)
    assert [(b.start, b.count) for b in blocks] == [(0, 124), (124, 2)]
    assert blocks[1].members == (Member("f", 0, 2),)


def test_overlapping_bit_tags_share_a_register() -> None:
    blocks = plan_reads([span("run", 10), span("fault", 10), span("word", 10)])
    assert [(b.start, b.count) for b in blocks] == [(10, 1)]
    assert [m.key for m in blocks[0].members] == ["fault", "run", "word"]


def test_slice_returns_each_tags_values() -> None:
    (block,) = plan_reads([span("speed", 100, 2, "input"), span("count", 104, 1, "input")])
    memory = [*encode_value(123.5, "float32"), 0, 0, 42]
    speed = block.slice(memory, "speed")
    assert decode_registers(speed, "float32") == 123.5
    assert block.slice(memory, "count") == [42]
    with pytest.raises(KeyError):
        block.slice(memory, "missing")
    with pytest.raises(PlanError, match="block reads 5"):
        block.slice(memory[:4], "speed")


def test_slice_accepts_byte_padded_coil_response() -> None:
    (block,) = plan_reads([span("a", 0, table="coil"), span("b", 2, table="coil")])
    bits = [True, False, False, False, False, False, False, False]  # 3 coils, padded to 8
    assert block.slice(bits, "a") == [True]
    assert block.slice(bits, "b") == [False]


def test_errors() -> None:
    with pytest.raises(PlanError, match="more than one read"):
        plan_reads([span("big", 0, 126)])
    with pytest.raises(PlanError, match="more than one read"):
        plan_reads([span("big", 0, 20)], max_registers=10)
    with pytest.raises(PlanError, match="duplicate"):
        plan_reads([span("a", 0), span("a", 5)])
    with pytest.raises(PlanError, match="max_gap"):
        plan_reads([], max_gap=-1)
    with pytest.raises(PlanError, match="max_registers"):
        plan_reads([], max_registers=126)
    with pytest.raises(PlanError, match="max_bits"):
        plan_reads([], max_bits=2001)
    with pytest.raises(PlanError, match="table"):
        ReadRequest(1, "memory", 0, 1)
    with pytest.raises(PlanError, match="unit"):
        ReadRequest(256, "holding", 0, 1)
    with pytest.raises(PlanError, match="outside"):
        ReadRequest(1, "holding", 65535, 2)
    with pytest.raises(PlanError, match="outside"):
        ReadRequest(1, "holding", 0, 0)
    assert plan_reads([]) == []


TABLE_NAMES = ("holding", "input", "coil", "discrete")


@st.composite
def tag_sets(draw: st.DrawFn) -> list[TagSpan]:
    n = draw(st.integers(0, 60))
    tags = []
    for i in range(n):
        table = draw(st.sampled_from(TABLE_NAMES))
        count = draw(st.integers(1, 40 if table in BIT_TABLES else 4))
        address = draw(st.integers(0, 200))
        tags.append(TagSpan(f"t{i}", ReadRequest(draw(st.integers(1, 3)), table, address, count)))
    return tags


@settings(max_examples=300)
@given(
    tags=tag_sets(),
    max_gap=st.integers(0, 20),
    max_regs=st.integers(4, 125),
    max_bits=st.integers(40, 200),
)
def test_plan_properties(tags: list[TagSpan], max_gap: int, max_regs: int, max_bits: int) -> None:
    blocks = plan_reads(tags, max_gap=max_gap, max_registers=max_regs, max_bits=max_bits)
    by_key = {t.key: t.request for t in tags}

    covered = [m.key for b in blocks for m in b.members]
    assert sorted(covered) == sorted(by_key)  # every tag exactly once
    assert blocks == sorted(blocks, key=lambda b: (b.unit, b.table, b.start))

    for block in blocks:
        limit = max_bits if block.table in BIT_TABLES else max_regs
        assert 1 <= block.count <= limit
        # Register memory where each register holds its own address makes slices checkable.
        memory = list(range(block.start, block.start + block.count))
        for member in block.members:
            req = by_key[member.key]
            assert (req.unit, req.table) == (block.unit, block.table)
            assert req.address == block.start + member.offset
            assert member.offset + member.size <= block.count
            assert block.slice(memory, member.key) == list(range(req.address, req.end))
        assert block.members[0].offset == 0
        assert max(m.offset + m.size for m in block.members) == block.count

    # Neighbouring blocks of one unit/table could not have been one read.
    for first, second in itertools.pairwise(blocks):
        if (first.unit, first.table) != (second.unit, second.table):
            continue
        limit = max_bits if first.table in BIT_TABLES else max_regs
        end1, end2 = first.start + first.count, second.start + second.count
        assert second.start - end1 > max_gap or max(end1, end2) - first.start > limit
