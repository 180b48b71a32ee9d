"""How a process learns, within a bound, that a credential lost its worth: the credential stamp.

Every change of a revoked token, a revoked token signing key, an API key or an agent key bumps
one number, ops.credential_stamp, in the same transaction (0032_credential_stamp.sql). A
process reads the number at most every `refresh_s` seconds and re-reads what it keeps in
memory (revocation lists, agent keys) only when the number moved. A poll rather than LISTEN:
it needs no dedicated connection, survives reconnects without losing a message, and works
through PgBouncer in transaction mode.

The bound: a process acts on a view read no more than `refresh_s` ago when it checks before
every use (ingest's agent keys), and no more than twice that where the check runs in the
background (the API's tokens, see cloud_api.auth). The read time counted is the moment before
the query started, so a change that commits while the query runs is never taken as seen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from cloud_api.config import REVOCATION_REFRESH_S

# Default of `security.revocation_refresh_seconds`, and ingest's refresh.
REFRESH_S = REVOCATION_REFRESH_S


class _Pool(Protocol):
    def connection(self, timeout: float | None = None) -> Any: ...


class CredentialStamp:
    """The last credential stamp acted on, and when it was read.

    `refresh(pool, reload)` reads the stamp when `refresh_s` has passed since the last read
    and calls `reload()` when it moved; a `reload` that raises leaves the stamp unaccepted, so
    the next due read calls it again.
    """

    def __init__(self, refresh_s: float = REFRESH_S, clock: Callable[[], float] = time.monotonic):
        self.refresh_s = refresh_s
        self.clock = clock
        self.version: int | None = None
        self.read_at = -math.inf

    def age(self) -> float:
        """Seconds since the view acted on was read."""
        return self.clock() - self.read_at

    def due(self) -> bool:
        return self.age() >= self.refresh_s

    def refresh(self, pool: _Pool, reload: Callable[[], None], *, force: bool = False) -> bool:
        """Read the stamp if due (or `force`); returns whether `reload` ran."""
        if not (force or self.due()):
            return False
        started = self.clock()
        with pool.connection() as conn:
            row = conn.execute("SELECT version FROM ops.credential_stamp").fetchone()
        version = int(row[0]) if row is not None else 0
        moved = version != self.version
        if moved:
            reload()
        self.version = version
        self.read_at = started
        return moved
