"""The one backoff policy: capped exponential delays, with jitter where many clients retry.

Attempt n (counted from 0) waits `first * 2**min(n, doublings)`, at most `cap`; with jitter
that delay is scaled by a random factor in [0.5, 1] so clients that failed together (a PLC
gateway restart, a broker restart) do not come back in step. Each caller keeps its own
attempt count and its own loop: a reconnect loop, a per-unit poll, a database retry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def jittered(delay: float) -> float:
    """`delay` scaled by a random factor in [0.5, 1]."""
    return delay * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Backoff:
    """Delays of a retry loop: `first`, doubling per attempt up to `cap`."""

    first: float
    cap: float
    jitter: bool = True
    doublings: int = 16  # beyond this many the cap holds anyway; bounds 2**n

    def base(self, attempt: int) -> float:
        """The delay before jitter of attempt `attempt` (0 for the first retry)."""
        factor: int = 2 ** min(max(attempt, 0), self.doublings)
        return min(self.cap, self.first * factor)

    def delay(self, attempt: int) -> float:
        """The delay to wait before attempt `attempt` + 1."""
        base = self.base(attempt)
        return jittered(base) if self.jitter else base


__all__ = ["Backoff", "jittered"]
