"""Running a hub in the background of a test, and waiting for conditions (never for time)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from connectors.sample import Sample

LIMIT_S = 30.0


async def wait_until(condition: Callable[[], bool], what: str, limit: float = LIMIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up after {limit:g}s waiting for {what}")
        await asyncio.sleep(0.02)


class Collected:
    def __init__(self) -> None:
        self.samples: list[Sample] = []

    async def __call__(self, sample: Sample) -> None:
        self.samples.append(sample)

    def of(self, equipment: str, signal: str) -> list[Sample]:
        return [s for s in self.samples if s.equipment_id == equipment and s.signal == signal]

    def value(self, equipment: str, signal: str) -> object:
        last = self.last(equipment, signal)
        return None if last is None else last.value

    def quality(self, equipment: str, signal: str) -> str | None:
        last = self.last(equipment, signal)
        return None if last is None else last.quality

    def last(self, equipment: str, signal: str) -> Sample | None:
        found = self.of(equipment, signal)
        return found[-1] if found else None


@contextlib.asynccontextmanager
async def running(hub: Any) -> AsyncIterator[Collected]:
    """The hub runs while the block runs; its samples collect in the yielded object."""
    got = Collected()
    async with hub:
        task = asyncio.create_task(hub.run(got))
        try:
            yield got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
