"""A hub's poll loop ends when cancelled, even when a driver turns the cancellation of its
pending request into an ordinary error (which the loop otherwise survives)."""

from __future__ import annotations

import asyncio

import pytest

from connectors.connector import raise_if_cancelled


async def test_a_cancellation_turned_into_an_error_still_ends_the_loop() -> None:
    calls = 0
    waiting = asyncio.Event()

    async def driver_request() -> None:
        nonlocal calls
        calls += 1
        waiting.set()
        try:
            await asyncio.Event().wait()  # a request that never gets its answer
        except asyncio.CancelledError:
            raise RuntimeError("request cancelled") from None  # what some drivers do

    async def poll_loop() -> None:
        while True:
            try:
                await driver_request()
            except Exception as exc:  # a hub survives driver errors...
                raise_if_cancelled(exc)  # ...but not its own cancellation

    task = asyncio.create_task(poll_loop())
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
