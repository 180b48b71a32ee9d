"""`edge-agent check -c FILE`: validate the configuration, try each connection once, and print
per equipment which signals read and what value they have, or why not."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from agent import readable
from agent.config import (
    CONFIG_OPTION_HELP,
    INTEGER_WIDTHS,
    AgentConfig,
    EquipmentConfig,
    SignalConfig,
    load_config,
)
from common.logs import configure_logging
from connectors.connector import Hub
from connectors.registry import CONNECTOR_TYPES, build_hub
from connectors.sample import Sample
from oee.quantities import COUNTER_SIGNALS


@dataclass
class SignalResult:
    equipment: str
    signal: str
    connection: str
    sample: Sample | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.sample is not None and self.sample.quality == "good"


def counter_width(signal: SignalConfig, sample: Sample | None) -> str:
    """The width and sign a counter is counted at, and what decided them."""
    declared = sample.source_type if sample is not None else None
    counter = signal.counter_spec(declared)
    if signal.width is not None:
        why = f"width: {signal.width}"
    elif not signal.width_from_source:
        why = f"type: {signal.data_type}"
    elif declared in INTEGER_WIDTHS:
        why = f"the PLC declares {declared}"
    else:
        why = f"default type {signal.data_type}; the PLC declared no integer type"
    sign = "signed" if counter.signed else "unsigned"
    return f"counted as {counter.width}-bit {sign} ({why})"


def _expected(config: AgentConfig, connection_id: str, field: str) -> list[tuple[str, str]]:
    return [
        (eq.id, name)
        for eq in config.equipment
        if eq.connection == connection_id
        for name, sig in eq.signals.items()
        if getattr(sig, field) is not None
    ]


class Progress:
    """What `check` says while a PLC does not answer yet, on stderr (stdout keeps the table).

    On a terminal one line is rewritten: "waiting for plc-2 (3 s of 10 s)..."; otherwise
    (a log, a pipe) one line per connection that is still silent after a few seconds."""

    QUIET_S = 2.0  # a PLC that answers within this is not worth a line

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.waiting: dict[str, tuple[float, float]] = {}  # connection -> (elapsed, limit)
        self.announced: set[str] = set()
        self._shown = ""

    def update(self, connection: str, elapsed: float, limit: float, done: bool) -> None:
        if done:
            self.waiting.pop(connection, None)
        else:
            self.waiting[connection] = (elapsed, limit)
        if self.tty:
            self._redraw()
        elif not done and elapsed >= self.QUIET_S and connection not in self.announced:
            self.announced.add(connection)
            self.stream.write(
                f"waiting for {connection} (no answer after {int(elapsed)} s; "
                f"gives up after {readable.duration(limit)})\n"
            )
            self.stream.flush()

    def _redraw(self) -> None:
        slow = {c: w for c, w in self.waiting.items() if w[0] >= 1.0}
        text = ", ".join(
            f"{c} ({int(elapsed)} s of {int(limit)} s)" for c, (elapsed, limit) in slow.items()
        )
        text = f"waiting for {text}..." if text else ""
        if text != self._shown:
            self.stream.write("\r" + text.ljust(len(self._shown)) + ("" if text else "\r"))
            self.stream.flush()
            self._shown = text

    def close(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self.stream.flush()
            self._shown = ""


ProgressFn = Callable[[str, float, float, bool], None]


async def _try(
    hub: Hub,
    expected: list[tuple[str, str]],
    limit: float,
    progress: ProgressFn | None = None,
) -> dict[str, Sample]:
    latest: dict[str, Sample] = {}
    keys = {f"{e}/{s}" for e, s in expected}

    async def collect(sample: Sample) -> None:
        latest[f"{sample.equipment_id}/{sample.signal}"] = sample

    def settled() -> bool:
        # every signal has a good value, or a bad one with a known reason
        return keys <= latest.keys() and all(
            latest[k].quality == "good" or k in hub.problems for k in keys
        )

    name = hub.config.id
    async with hub:
        task = asyncio.create_task(hub.run(collect))
        started = time.monotonic()
        deadline = started + limit
        try:
            # hub.problems changes without an event to wait on; a short poll is fine for a CLI
            while time.monotonic() < deadline and not task.done() and not settled():
                if progress is not None:
                    progress(name, time.monotonic() - started, limit, False)
                await asyncio.sleep(0.05)
        finally:
            if progress is not None:
                progress(name, time.monotonic() - started, limit, True)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return latest


# What a Modbus device answers, in the words of the plant floor (the hub names the codes).
_MODBUS_WORDS = {
    "ILLEGAL_FUNCTION": "the device does not offer this kind of read (Modbus exception 1)",
    "ILLEGAL_DATA_ADDRESS": "the device has no such register (Modbus exception 2); "
    "check the address and `addressing:` (0- or 1-based)",
    "ILLEGAL_DATA_VALUE": "the device refuses a read of this length (Modbus exception 3)",
    "SERVER_DEVICE_FAILURE": "the device reports a failure (Modbus exception 4; a gateway "
    "says so for a unit id it does not serve)",
    "ACKNOWLEDGE": "the device is busy with a long command (Modbus exception 5)",
    "SERVER_DEVICE_BUSY": "the device is busy (Modbus exception 6)",
    "MEMORY_PARITY_ERROR": "the device reports a memory error (Modbus exception 8)",
    "GATEWAY_PATH_UNAVAILABLE": "the gateway has no path to this unit (Modbus exception 10); "
    "check `unit:` and the gateway's routing",
    "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND": "the gateway reports that the unit behind it "
    "does not answer (Modbus exception 11)",
}
_NO_ANSWER = re.compile(r"no answer \((?:Modbus Error: )?\[Input/Output\][^)]*\)")
_LIBRARY_PREFIX = re.compile(r"Modbus Error: (?:\[[^\]]*\] )?")


def plain_reason(reason: str, timeout: float | None = None) -> str:
    """A connector's reason without the protocol library's wording."""
    for name, words in _MODBUS_WORDS.items():
        if reason.endswith(name):
            return reason[: -len(name)] + words
    limit = f" within {readable.duration(timeout)}" if timeout else ""
    reason = _NO_ANSWER.sub(f"no answer{limit}", reason)
    return _LIBRARY_PREFIX.sub("", reason)


async def check_config(
    config: AgentConfig, limit: float | None = None, progress: ProgressFn | None = None
) -> list[SignalResult]:
    """Try every connection concurrently; one result per configured signal."""

    async def one(conn: object) -> list[SignalResult]:
        hub = build_hub(conn, config.equipment)  # type: ignore[arg-type]
        field = CONNECTOR_TYPES[hub.config.type].signal_field
        expected = _expected(config, hub.config.id, field)
        timeout = float(getattr(conn, "timeout", 5.0))
        latest = await _try(hub, expected, limit or max(5.0, timeout * 3 + 2), progress)
        out = []
        for eq, sig in expected:
            key = f"{eq}/{sig}"
            sample = latest.get(key)
            reason = None
            if sample is None or sample.quality != "good":
                reason = plain_reason(
                    hub.problems.get(key)
                    or getattr(hub, "last_error", None)
                    or "no value within the time limit",
                    timeout,
                )
            out.append(SignalResult(eq, sig, hub.config.id, sample, reason))
        return out

    groups = await asyncio.gather(*(one(c) for c in config.connections))
    return [r for g in groups for r in g]


def describe(equipment: EquipmentConfig, result: SignalResult) -> str:
    """A value as the engine will read it: a state by its name, a reason by its text."""
    sample = result.sample
    if sample is None:
        return "-"
    signal = equipment.signals[result.signal]  # type: ignore[index]
    value = sample.value
    if signal.map:
        code = equipment.oee_spec().code(value)
        if code in signal.map:
            return f"{signal.map[code]} (code {code})"
        if result.signal == "state":
            return f"unknown (code {code} is not in the map)"
        return f"none (code {code} is not in the map)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _connection_label(config: AgentConfig, equipment: EquipmentConfig) -> str:
    if equipment.connection is None:
        return "no connection"
    kinds = {c.id: c.type for c in config.connections}
    unit = (
        f", unit {equipment.unit}"
        if kinds.get(equipment.connection, "").startswith("modbus")
        else ""
    )
    return f"connection {equipment.connection}{unit}"


def report(config: AgentConfig, results: list[SignalResult]) -> list[str]:
    """The table `check` prints: per equipment, each signal's value or why it has none."""
    by_eq: dict[str, list[SignalResult]] = {}
    for r in results:
        by_eq.setdefault(r.equipment, []).append(r)
    out = []
    for eq in config.equipment:
        rows = by_eq.get(eq.id, [])
        out.append(f"{eq.id} ({_connection_label(config, eq)}):")
        if not rows:
            out.append("  no signals read from a connection")
        said = None
        for r in rows:
            if r.ok:
                out.append(f"  {r.signal:<14} ok    {describe(eq, r)}")
            else:
                # one unit, one cause: said once per equipment
                out.append(
                    f"  {r.signal:<14} FAIL  {'(as above)' if r.reason == said else r.reason}"
                )
                said = r.reason
            if r.signal in COUNTER_SIGNALS:
                out.append(f"  {'':<14}       {counter_width(eq.signals[r.signal], r.sample)}")  # type: ignore[index]
    failed = sum(not r.ok for r in results)
    out.append(f"{len(results) - failed} of {len(results)} signal(s) read")
    return out


def as_json(config: AgentConfig, results: list[SignalResult]) -> dict[str, object]:
    equipment = {eq.id: eq for eq in config.equipment}
    signals = []
    for r in results:
        eq = equipment[r.equipment]
        row: dict[str, object] = {
            "equipment": r.equipment,
            "signal": r.signal,
            "connection": r.connection,
            "ok": r.ok,
            "value": r.sample.value if r.sample is not None and r.ok else None,
            "text": describe(eq, r) if r.ok else None,
            "read_at": r.sample.ts.isoformat() if r.sample is not None else None,
            "reason": r.reason,
        }
        if r.signal in COUNTER_SIGNALS:
            counter = eq.signals[r.signal].counter_spec(  # type: ignore[index]
                r.sample.source_type if r.sample is not None else None
            )
            row["counter"] = {"width": counter.width, "signed": counter.signed}
        signals.append(row)
    failed = sum(not r.ok for r in results)
    return {"ok": failed == 0, "read": len(results) - failed, "signals": signals}


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    # The table says what failed, once; the connectors' own log lines would say it again
    # (and mix into the table): they go to stderr with --verbose only.
    configure_logging("info" if args.verbose else "error", json=False)
    if not args.json:
        print(
            f"{args.config}: configuration ok ({len(config.equipment)} equipment, "
            f"{len(config.connections)} connection(s))",
            flush=True,
        )
    progress = None if args.json and not sys.stderr.isatty() else Progress()
    try:
        results = asyncio.run(
            check_config(config, args.timeout, progress.update if progress else None)
        )
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        print(json.dumps(as_json(config, results)))
    else:
        print("\n".join(report(config, results)))
    return 0 if all(r.ok for r in results) else 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate the config and read every signal once")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait per connection (default: 3 x its timeout + 2 s, at least 5 s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument(
        "--verbose", action="store_true", help="also print the connectors' log lines (stderr)"
    )
    p.set_defaults(func=cmd_check)
