"""The connector seam: what a hub looks like to the agent, and what the agent gives a hub.

A hub owns one physical connection (a TCP socket, a serial line, an OPC UA session) and its
reconnect loop: `async with hub: await hub.run(emit)`, where `emit` takes one `Sample` at a
time. The equipment and signal shapes here are structural, so `connectors` never imports the
agent's configuration models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from connectors.sample import Sample

Emit = Callable[[Sample], Awaitable[None]]


class SignalSource(Protocol):
    """Where one signal is read: a Modbus address or an OPC UA node, and how to decode it."""

    @property
    def address(self) -> str | None: ...
    @property
    def node(self) -> str | None: ...
    @property
    def data_type(self) -> str: ...
    @property
    def order(self) -> str: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...
    @property
    def bit(self) -> int | None: ...
    @property
    def length(self) -> int | None: ...


class EquipmentSource(Protocol):
    """One equipment as a connector sees it: which connection, which unit, which signals."""

    @property
    def id(self) -> str: ...
    @property
    def connection(self) -> str | None: ...
    @property
    def unit(self) -> int: ...
    @property
    def signals(self) -> Mapping[Any, SignalSource]: ...


class ConnectionSource(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...


@runtime_checkable
class Hub(Protocol):
    """One physical connection: its configuration, whether it is connected, how many requests
    it sent, how long the last read took, and for each "equipment/signal" that currently has
    no value, why not."""

    @property
    def config(self) -> ConnectionSource: ...
    @property
    def connected(self) -> bool: ...
    @property
    def requests(self) -> int: ...
    @property
    def last_read_latency_s(self) -> float | None: ...
    @property
    def problems(self) -> dict[str, str]: ...

    async def __aenter__(self) -> Hub: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def run(self, emit: Emit) -> None: ...


def raise_if_cancelled(exc: BaseException | None = None) -> None:
    """Re-raise a cancellation of the current task that something below it swallowed.

    A hub's poll loop survives any device or driver error, so a cancellation can get lost on
    the way up in two ways, and either would make the loop outlive its cancellation and the
    agent's shutdown wait forever:

    - a driver catches the CancelledError of a pending request and raises its own exception
      instead (call this with that exception in the loop's error handler);
    - Python 3.11's `asyncio.wait_for`, used by pymodbus and asyncua for every request,
      returns the result instead of raising when the cancellation arrives just as the
      request completes (fixed in 3.12), so the loop carries on as if nothing happened
      (call this with no argument once per iteration).

    The task still counts the pending cancel request (Task.cancelling), so the loop can tell.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc
