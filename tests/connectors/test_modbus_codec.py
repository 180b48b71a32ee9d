"""Modbus codec: known vectors per type and order, bits, scaling, addresses, round trips."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.modbus.codec import (
    DATA_TYPES,
    ORDERS,
    Address,
    CodecError,
    Value,
    decode_registers,
    encode_value,
    parse_address,
    register_count,
)

# (type, value, {order: wire registers}); 123.456 is 0x42F6E979 as float32.
VECTORS: list[tuple[str, Value, dict[str, list[int]]]] = [
    (
        "float32",
        123.456,
        {
            "ABCD": [0x42F6, 0xE979],
            "CDAB": [0xE979, 0x42F6],
            "BADC": [0xF642, 0x79E9],
            "DCBA": [0x79E9, 0xF642],
        },
    ),
    (
        "int32",
        -2,
        {
            "ABCD": [0xFFFF, 0xFFFE],
            "CDAB": [0xFFFE, 0xFFFF],
            "BADC": [0xFFFF, 0xFEFF],
            "DCBA": [0xFEFF, 0xFFFF],
        },
    ),
    (
        "uint32",
        0x12345678,
        {
            "ABCD": [0x1234, 0x5678],
            "CDAB": [0x5678, 0x1234],
            "BADC": [0x3412, 0x7856],
            "DCBA": [0x7856, 0x3412],
        },
    ),
    (
        "uint64",
        0x0102030405060708,
        {
            "ABCD": [0x0102, 0x0304, 0x0506, 0x0708],
            "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
            "BADC": [0x0201, 0x0403, 0x0605, 0x0807],
            "DCBA": [0x0807, 0x0605, 0x0403, 0x0201],
        },
    ),
    (
        "int64",
        -2,
        {
            "ABCD": [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
            "CDAB": [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
            "BADC": [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
            "DCBA": [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
        },
    ),
    (
        "float64",
        123.456,  # 0x405EDD2F1A9FBE77
        {
            "ABCD": [0x405E, 0xDD2F, 0x1A9F, 0xBE77],
            "CDAB": [0xBE77, 0x1A9F, 0xDD2F, 0x405E],
            "BADC": [0x5E40, 0x2FDD, 0x9F1A, 0x77BE],
            "DCBA": [0x77BE, 0x9F1A, 0x2FDD, 0x5E40],
        },
    ),
    ("int16", -2, {"ABCD": [0xFFFE], "CDAB": [0xFFFE], "BADC": [0xFEFF], "DCBA": [0xFEFF]}),
    ("uint16", 0x1234, {"ABCD": [0x1234], "CDAB": [0x1234], "BADC": [0x3412], "DCBA": [0x3412]}),
]
CASES = [(t, v, o, regs) for t, v, by_order in VECTORS for o, regs in by_order.items()]


@pytest.mark.parametrize(("data_type", "value", "order", "registers"), CASES)
def test_known_vectors(data_type: str, value: Value, order: str, registers: list[int]) -> None:
    decoded = decode_registers(registers, data_type, order)
    assert type(decoded) is type(value)
    # float32 cannot hold 123.456 exactly; the nearest float32 is within 1e-7 relative.
    assert decoded == (pytest.approx(value, rel=1e-7) if data_type == "float32" else value)
    assert encode_value(value, data_type, order) == registers


def test_register_counts() -> None:
    counts = {t: register_count(t) for t in DATA_TYPES if t != "string"}
    assert counts == {
        "bool": 1,
        "int16": 1,
        "uint16": 1,
        "int32": 2,
        "uint32": 2,
        "int64": 4,
        "uint64": 4,
        "float32": 2,
        "float64": 4,
    }
    assert register_count("string", 5) == 5
    for data_type, length, message in (
        ("string", None, "length >= 1"),
        ("string", 0, "length >= 1"),
        ("int16", 2, "only applies to string"),
        ("int128", None, "unknown data type"),
    ):
        with pytest.raises(CodecError, match=message):
            register_count(data_type, length)


def test_string_strips_trailing_nul_and_space_and_honours_byte_swap() -> None:
    regs = [0x4142, 0x4320, 0x0000]  # "ABC " + NULs
    assert decode_registers(regs, "string", length=3) == "ABC"
    assert decode_registers(regs, "string") == "ABC"  # length inferred from the registers
    assert decode_registers([0x2041, 0x4242], "string") == " ABB"  # leading space kept
    assert decode_registers([0x4241, 0x0043], "string", "BADC") == "ABC"
    assert decode_registers([0x4241, 0x0043], "string", "DCBA") == "ABC"  # words not reversed
    assert encode_value("ABC", "string", length=3) == [0x4142, 0x4300, 0x0000]
    assert encode_value("ABC", "string") == [0x4142, 0x4300]
    assert encode_value("ABC", "string", "BADC") == [0x4241, 0x0043]
    assert encode_value("", "string") == [0]
    with pytest.raises(CodecError, match="does not fit"):
        encode_value("ABCDE", "string", length=2)
    with pytest.raises(CodecError, match="ASCII"):
        encode_value("é", "string")
    with pytest.raises(CodecError, match="non-ASCII"):
        decode_registers([0xC3A9], "string")
    with pytest.raises(CodecError, match="needs 3"):
        decode_registers([0x4142], "string", length=3)


def test_bool_from_coil_and_from_register_bit() -> None:
    assert decode_registers([1], "bool") is True
    assert decode_registers([0], "bool") is False
    assert decode_registers([True], "bool") is True  # pymodbus bit lists hold bools
    reg = 0b1000_0000_0000_0101
    bits = [decode_registers([reg], "bool", bit=b) for b in range(16)]
    assert bits == [True, False, True] + [False] * 12 + [True]
    # Byte-swapped devices: the bit indexes the register after the swap.
    assert decode_registers([0x0100], "bool", "BADC", bit=0) is True
    assert decode_registers([0x0100], "bool", "ABCD", bit=8) is True
    assert encode_value(True, "bool") == [1]
    assert encode_value(0, "bool") == [0]
    with pytest.raises(CodecError, match=r"0\.\.15"):
        decode_registers([1], "bool", bit=16)
    with pytest.raises(CodecError, match="bit only applies"):
        decode_registers([1], "int16", bit=0)
    with pytest.raises(CodecError):
        encode_value(2, "bool")


def test_scale_and_offset() -> None:
    raw = decode_registers([250], "int16")
    assert raw == 250
    assert isinstance(raw, int)
    scaled = decode_registers([250], "int16", scale=0.1, offset=-5.0)
    assert isinstance(scaled, float)
    assert scaled == pytest.approx(20.0)
    assert decode_registers([0xFFFF, 0xFFFE], "int32", scale=2) == -4
    assert decode_registers([0x42F6, 0xE979], "float32", offset=1.0) == pytest.approx(124.456)
    with pytest.raises(CodecError, match="scale/offset"):
        decode_registers([1], "bool", scale=2.0)
    with pytest.raises(CodecError, match="scale/offset"):
        decode_registers([0x4142], "string", offset=1.0)


def test_nan_and_inf_pass_through() -> None:
    nan = decode_registers([0x7FC0, 0x0000], "float32")
    assert isinstance(nan, float)
    assert math.isnan(nan)
    assert decode_registers([0xFF80, 0x0000], "float32") == -math.inf
    assert encode_value(math.inf, "float32") == [0x7F80, 0x0000]


def test_decode_errors() -> None:
    with pytest.raises(CodecError, match="needs 2 register"):
        decode_registers([1], "float32")
    with pytest.raises(CodecError, match="needs 1 register"):
        decode_registers([1, 2], "uint16")
    with pytest.raises(CodecError, match=r"0..65535"):
        decode_registers([65536], "uint16")
    with pytest.raises(CodecError, match=r"0..65535"):
        decode_registers([-1], "int16")
    with pytest.raises(CodecError, match="unknown order"):
        decode_registers([1], "uint16", "ABDC")
    with pytest.raises(CodecError, match="unknown data type"):
        decode_registers([1], "word")


def test_encode_errors() -> None:
    with pytest.raises(CodecError, match=r"-32768..32767"):
        encode_value(40000, "int16")
    with pytest.raises(CodecError, match=r"0..65535"):
        encode_value(-1, "uint16")
    with pytest.raises(CodecError, match="int"):
        encode_value(1.5, "int32")
    with pytest.raises(CodecError, match="does not fit"):
        encode_value(1e300, "float32")
    with pytest.raises(CodecError, match="number"):
        encode_value("1", "float64")


@pytest.mark.parametrize(
    ("text", "base", "expected"),
    [
        ("holding:0", 0, Address("holding", 0)),
        ("hr:100", 0, Address("holding", 100)),
        ("input:10", 0, Address("input", 10)),
        ("ir:10", 1, Address("input", 9)),
        ("coil:3", 0, Address("coil", 3)),
        ("CO:3", 1, Address("coil", 2)),
        ("discrete:7", 0, Address("discrete", 7)),
        (" di : 7 ", 0, Address("discrete", 7)),
        ("holding:65535", 0, Address("holding", 65535)),
        ("holding:65536", 1, Address("holding", 65535)),
        ("40001", 0, Address("holding", 0)),
        ("40001", 1, Address("holding", 0)),  # Modicon is 1-based whatever the base
        ("49999", 0, Address("holding", 9998)),
        ("30001", 0, Address("input", 0)),
        ("00001", 0, Address("coil", 0)),
        ("10010", 0, Address("discrete", 9)),
        ("400001", 0, Address("holding", 0)),
        ("465536", 0, Address("holding", 65535)),
        ("300100", 0, Address("input", 99)),
    ],
)
def test_parse_address(text: str, base: int, expected: Address) -> None:
    assert parse_address(text, base) == expected


@pytest.mark.parametrize(
    ("text", "base", "message"),
    [
        ("holding:0", 1, "1-based"),
        ("holding:65536", 0, "65535"),
        ("465537", 0, "65535"),
        ("register:1", 0, "unknown table"),
        ("holding:", 0, "number"),
        ("holding:-1", 0, "number"),
        ("holding:x1", 0, "number"),
        ("holding:²", 0, "number"),
        ("40000", 0, "offset 0"),
        ("400000", 0, "offset 0"),
        ("20001", 0, "start with"),
        ("4001", 0, "cannot parse"),
        ("4000001", 0, "cannot parse"),
        ("", 0, "cannot parse"),
        ("holding:1", 2, "base"),
    ],
)
def test_parse_address_errors(text: str, base: int, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        parse_address(text, base)


def test_address_is_bit() -> None:
    assert parse_address("coil:1").is_bit
    assert parse_address("10001").is_bit
    assert not parse_address("40001").is_bit


INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
orders = st.sampled_from(ORDERS)


@given(data=st.data(), data_type=st.sampled_from(sorted(INT_RANGES)), order=orders)
def test_int_round_trip(data: st.DataObject, data_type: str, order: str) -> None:
    value = data.draw(st.integers(*INT_RANGES[data_type]))
    registers = encode_value(value, data_type, order)
    assert len(registers) == register_count(data_type)
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode_registers(registers, data_type, order) == value


@given(data=st.data(), data_type=st.sampled_from(sorted(INT_RANGES)), order=orders)
def test_int_registers_round_trip(data: st.DataObject, data_type: str, order: str) -> None:
    # Integer codings are bijections, so any register words must survive decode -> encode.
    words = st.integers(0, 0xFFFF)
    count = register_count(data_type)
    registers = data.draw(st.lists(words, min_size=count, max_size=count))
    value = decode_registers(registers, data_type, order)
    assert isinstance(value, int)
    assert encode_value(value, data_type, order) == registers


@given(value=st.floats(width=32), order=orders)
def test_float32_round_trip(value: float, order: str) -> None:
    decoded = decode_registers(encode_value(value, "float32", order), "float32", order)
    assert isinstance(decoded, float)
    assert decoded == value or (math.isnan(decoded) and math.isnan(value))


@given(value=st.floats(), order=orders)
def test_float64_round_trip(value: float, order: str) -> None:
    decoded = decode_registers(encode_value(value, "float64", order), "float64", order)
    assert isinstance(decoded, float)
    assert decoded == value or (math.isnan(decoded) and math.isnan(value))


@given(
    value=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    order=orders,
    spare=st.integers(0, 3),
)
def test_string_round_trip(value: str, order: str, spare: int) -> None:
    length = max(1, (len(value) + 1) // 2) + spare
    registers = encode_value(value, "string", order, length)
    assert len(registers) == length
    assert decode_registers(registers, "string", order, length=length) == value.rstrip(" ")


@given(value=st.booleans(), order=orders)
def test_bool_round_trip(value: bool, order: str) -> None:
    assert decode_registers(encode_value(value, "bool", order), "bool", order) is value
