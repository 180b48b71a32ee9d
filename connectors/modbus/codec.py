"""Modbus value codec: register words <-> typed values, byte/word order, scaling, addresses.

Pure functions with no I/O and no pymodbus import, so decoding keeps working whatever
pymodbus does to its own conversion helpers between releases.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Value = bool | int | float | str
Table = Literal["holding", "input", "coil", "discrete"]

TABLES: tuple[Table, ...] = ("coil", "discrete", "holding", "input")
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})
Order = Literal["ABCD", "DCBA", "BADC", "CDAB"]
DataType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
ORDERS: tuple[str, ...] = get_args(Order)
DATA_TYPES: tuple[str, ...] = get_args(DataType)

# struct format (big-endian once words/bytes are put back in ABCD order) and register count.
_NUMERIC: dict[str, tuple[str, int]] = {
    "int16": (">h", 1),
    "uint16": (">H", 1),
    "int32": (">i", 2),
    "uint32": (">I", 2),
    "int64": (">q", 4),
    "uint64": (">Q", 4),
    "float32": (">f", 2),
    "float64": (">d", 4),
}
_INT_BITS: dict[str, tuple[int, bool]] = {
    "int16": (16, True),
    "uint16": (16, False),
    "int32": (32, True),
    "uint32": (32, False),
    "int64": (64, True),
    "uint64": (64, False),
}
_TABLE_ALIASES: dict[str, Table] = {
    "holding": "holding",
    "hr": "holding",
    "input": "input",
    "ir": "input",
    "coil": "coil",
    "co": "coil",
    "discrete": "discrete",
    "di": "discrete",
}
_MODICON_PREFIX: dict[str, Table] = {"0": "coil", "1": "discrete", "3": "input", "4": "holding"}
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() would also accept e.g. "²"


class CodecError(ValueError):
    """A value, register list, data type, order or address that cannot be coded."""


@dataclass(frozen=True, slots=True)
class Address:
    """One Modbus data item: its table and the 0-based address sent on the wire."""

    table: Table
    address: int

    @property
    def is_bit(self) -> bool:
        return self.table in BIT_TABLES


def _check_type(data_type: str) -> None:
    if data_type not in DATA_TYPES:
        choices = ", ".join(DATA_TYPES)
        raise CodecError(f"unknown data type {data_type!r}; expected one of {choices}")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise CodecError(f"unknown order {order!r}; expected one of {', '.join(ORDERS)}")


def register_count(data_type: str, length: int | None = None) -> int:
    """Registers (or bits, for a coil/discrete bool) one value of `data_type` occupies."""
    _check_type(data_type)
    if data_type == "string":
        if length is None or length < 1:
            raise CodecError(f"string needs length >= 1 (registers), got {length!r}")
        return length
    if length is not None:
        raise CodecError(f"length only applies to string, not {data_type}")
    return 1 if data_type == "bool" else _NUMERIC[data_type][1]


def _reorder(words: Sequence[int], order: str, *, word_swap: bool = True) -> list[int]:
    # Involution between wire words and ABCD (big-endian) words: the same call decodes and
    # encodes. Word reversal and per-word byte swap commute, so their order does not matter.
    out = list(words)
    if word_swap and order in ("CDAB", "DCBA"):
        out.reverse()
    if order in ("BADC", "DCBA"):
        out = [((w & 0xFF) << 8) | (w >> 8) for w in out]
    return out


def _pack(words: Sequence[int]) -> bytes:
    return b"".join(w.to_bytes(2, "big") for w in words)


def _unpack(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def decode_registers(
    registers: Sequence[int],
    data_type: str,
    order: str = "ABCD",
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    bit: int | None = None,
    length: int | None = None,
) -> Value:
    """Decode wire registers (or one coil/discrete bit) into a typed engineering value.

    `bit` picks bit 0 (LSB) .. 15 of the register read as uint16 in `order`. Strings honour
    only the byte swap of `order` (BADC/DCBA); their registers are always in ascending order.
    NaN/inf floats are returned as they are.
    """
    _check_type(data_type)
    _check_order(order)
    for r in registers:
        if not isinstance(r, int) or not 0 <= r <= 0xFFFF:
            raise CodecError(f"register value {r!r} is not an integer in 0..65535")
    if data_type == "string" and length is None:
        length = len(registers)
    expected = register_count(data_type, length)
    if len(registers) != expected:
        raise CodecError(f"{data_type} needs {expected} register(s), got {len(registers)}")
    if bit is not None and data_type != "bool":
        raise CodecError(f"bit only applies to bool, not {data_type}")
    if data_type in ("bool", "string") and (scale != 1 or offset != 0):
        raise CodecError(f"scale/offset only apply to numeric types, not {data_type}")

    if data_type == "bool":
        if bit is None:
            return bool(registers[0])
        if not 0 <= bit <= 15:
            raise CodecError(f"bit must be in 0..15, got {bit}")
        return bool((_reorder(registers, order)[0] >> bit) & 1)
    if data_type == "string":
        data = _pack(_reorder(registers, order, word_swap=False)).rstrip(b"\x00 ")
        try:
            return data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise CodecError(f"string registers hold non-ASCII bytes: {data!r}") from exc

    fmt, _ = _NUMERIC[data_type]
    raw: int | float = struct.unpack(fmt, _pack(_reorder(registers, order)))[0]
    if scale != 1 or offset != 0:
        return raw * scale + offset
    return raw


def encode_value(
    value: Value, data_type: str, order: str = "ABCD", length: int | None = None
) -> list[int]:
    """Encode `value` into wire registers; the inverse of `decode_registers` (no scaling).

    A string without `length` takes as many registers as it needs; shorter strings are padded
    with NULs.
    """
    _check_type(data_type)
    _check_order(order)
    if data_type == "bool":
        if not isinstance(value, bool | int) or value not in (0, 1):
            raise CodecError(f"bool value must be True/False or 0/1, got {value!r}")
        register_count(data_type, length)
        return [int(value)]
    if data_type == "string":
        if not isinstance(value, str):
            raise CodecError(f"string value must be str, got {type(value).__name__}")
        try:
            data = value.encode("ascii")
        except UnicodeEncodeError as exc:
            raise CodecError(f"string value is not ASCII: {value!r}") from exc
        needed = max(1, (len(data) + 1) // 2)
        count = register_count(data_type, needed if length is None else length)
        if len(data) > 2 * count:
            raise CodecError(f"string of {len(data)} bytes does not fit {count} register(s)")
        return _reorder(_unpack(data.ljust(2 * count, b"\x00")), order, word_swap=False)

    fmt, _ = _NUMERIC[data_type]
    register_count(data_type, length)
    if data_type in _INT_BITS:
        bits, signed = _INT_BITS[data_type]
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise CodecError(f"{data_type} value must be an int in {lo}..{hi}, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{data_type} value must be a number, got {value!r}")
    try:
        data = struct.pack(fmt, value)
    except (OverflowError, struct.error) as exc:
        raise CodecError(f"{value!r} does not fit {data_type}: {exc}") from exc
    return _reorder(_unpack(data), order)


def parse_address(text: str, base: int = 0) -> Address:
    """Parse "holding:0" / "hr:0" (and input/ir, coil/co, discrete/di) or Modicon "40001".

    `base` says whether the number after the colon is 0- or 1-based; Modicon notation
    (5 or 6 digits, prefix 0 coil, 1 discrete, 3 input, 4 holding) is always 1-based.
    """
    if base not in (0, 1):
        raise CodecError(f"address base must be 0 or 1, got {base!r}")
    spec = text.strip().lower()
    if ":" in spec:
        name, _, number = (part.strip() for part in spec.partition(":"))
        table = _TABLE_ALIASES.get(name)
        if table is None:
            raise CodecError(
                f"unknown table {name!r} in address {text!r}; "
                "expected holding/hr, input/ir, coil/co or discrete/di"
            )
        if not _DIGITS.fullmatch(number):
            raise CodecError(f"address {text!r} needs a non-negative number after ':'")
        wire = int(number) - base
        if wire < 0:
            raise CodecError(f"address {text!r}: 0 is not valid with 1-based addressing")
    elif _DIGITS.fullmatch(spec) and len(spec) in (5, 6):
        maybe_table = _MODICON_PREFIX.get(spec[0])
        if maybe_table is None:
            raise CodecError(f"Modicon address {text!r} must start with 0, 1, 3 or 4")
        table = maybe_table
        wire = int(spec[1:]) - 1
        if wire < 0:
            raise CodecError(f"Modicon address {text!r} is 1-based; offset 0 is not valid")
    else:
        raise CodecError(
            f"cannot parse address {text!r}; expected 'table:number' (e.g. 'holding:0') "
            "or Modicon 5/6-digit notation (e.g. '40001')"
        )
    if wire > 0xFFFF:
        raise CodecError(f"address {text!r} is beyond the last Modbus address 65535")
    return Address(table, wire)
