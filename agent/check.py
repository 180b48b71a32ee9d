"""`edge-agent check -c FILE`: validate the configuration, try each connection once, and print
per equipment which signals read and what value they have, or why not."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass

from agent.config import CONFIG_OPTION_HELP, INTEGER_WIDTHS, AgentConfig, SignalConfig, load_config
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
        why = f"type: {signal.type}"
    elif declared in INTEGER_WIDTHS:
        why = f"the PLC declares {declared}"
    else:
        why = f"default type {signal.type}; the PLC declared no integer type"
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


async def _try(hub: Hub, expected: list[tuple[str, str]], limit: float) -> dict[str, Sample]:
    latest: dict[str, Sample] = {}
    keys = {f"{e}/{s}" for e, s in expected}

    async def collect(sample: Sample) -> None:
        latest[f"{sample.equipment_id}/{sample.signal}"] = sample

    def settled() -> bool:
        # every signal has a good value, or a bad one with a known reason
        return keys <= latest.keys() and all(
            latest[k].quality == "good" or k in hub.problems for k in keys
        )

    async with hub:
        task = asyncio.create_task(hub.run(collect))
        deadline = time.monotonic() + limit
        try:
            # hub.problems changes without an event to wait on; a short poll is fine for a CLI
            while time.monotonic() < deadline and not task.done() and not settled():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return latest


async def check_config(config: AgentConfig, limit: float | None = None) -> list[SignalResult]:
    """Try every connection concurrently; one result per configured signal."""

    async def one(conn: object) -> list[SignalResult]:
        hub = build_hub(conn, config.equipment)  # type: ignore[arg-type]
        field = CONNECTOR_TYPES[hub.config.type].signal_field
        expected = _expected(config, hub.config.id, field)
        timeout = float(getattr(conn, "timeout", 5.0))
        latest = await _try(hub, expected, limit or max(5.0, timeout * 3 + 2))
        out = []
        for eq, sig in expected:
            key = f"{eq}/{sig}"
            sample = latest.get(key)
            reason = None
            if sample is None or sample.quality != "good":
                reason = (
                    hub.problems.get(key)
                    or getattr(hub, "last_error", None)
                    or "no value within the time limit"
                )
            out.append(SignalResult(eq, sig, hub.config.id, sample, reason))
        return out

    groups = await asyncio.gather(*(one(c) for c in config.connections))
    return [r for g in groups for r in g]


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(
        f"{args.config}: configuration ok ({len(config.equipment)} equipment, "
        f"{len(config.connections)} connection(s))"
    )
    results = asyncio.run(check_config(config, args.timeout))
    by_eq: dict[str, list[SignalResult]] = {}
    for r in results:
        by_eq.setdefault(r.equipment, []).append(r)
    for eq in config.equipment:
        rows = by_eq.get(eq.id, [])
        print(f"{eq.id} (connection {eq.connection or '-'}):")
        if not rows:
            print("  no signals read from a connection")
        for r in rows:
            if r.ok and r.sample is not None:
                print(f"  {r.signal:<14} ok    {r.sample.value!r}  at {r.sample.ts.isoformat()}")
            else:
                print(f"  {r.signal:<14} FAIL  {r.reason}")
            if r.signal in COUNTER_SIGNALS:
                print(f"  {'':<14}       {counter_width(eq.signals[r.signal], r.sample)}")  # type: ignore[index]
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} signal(s) read")
    return 0 if failed == 0 else 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate the config and read every signal once")
    p.add_argument("-c", "--config", help=CONFIG_OPTION_HELP)
    p.add_argument("--timeout", type=float, help="seconds per connection (default from config)")
    p.set_defaults(func=cmd_check)
