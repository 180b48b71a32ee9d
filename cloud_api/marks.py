"""Scope members and data watermarks kept in memory, invalidated by PostgreSQL notifications.

A result-cache hit used to need a database round trip only to learn the scope's members and
data watermark (the cache key). This memo keeps them per (scope, window days, visible sites)
so a hit needs no database at all, and stays correct because of the triggers of
0004_data_notify.sql: every committed change of rollups.data_versions notifies the channel
`gateway_data` with its (site, equipment), and every change of the registry (or a deletion of
versions) notifies with an empty payload, meaning "forget everything".

Validity is tracked with one counter (`_seq`) bumped by each notification. An entry carries
the counter value read before its database query ran (its stamp); it is used only while no
notification about one of its members, and no "forget everything", came after that stamp.
Reading the stamp before the query errs on the safe side: a change that commits while the
query runs makes the entry invalid even if the query already saw it.

Fail closed: the memo answers only while the listening connection is up. When it drops
(server restart, network, pg_terminate_backend) every lookup goes back to the database at
once, and after reconnecting everything remembered before is forgotten, because
notifications sent in between were lost. A silent loss of the connection is found by a probe
once a second at the latest.

What it does not give: a change is seen by this process when its notification arrives, which
is after the writer's commit returned (normally well under a millisecond on one machine); a
reader racing a writer by less than that may get the result from just before the commit,
exactly as if it had asked a moment earlier.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Hashable

import psycopg
import structlog

from cloud_api.queries import Member

log = structlog.get_logger("cloud_api.marks")

CHANNEL = "gateway_data"
APPLICATION = "gateway-api-data-marks"  # finds the listener in pg_stat_activity
PROBE_SECONDS = 1.0
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


class DataMarks:
    """The memo and the thread that listens for invalidations (start() / stop())."""

    def __init__(self, url: str, *, max_entries: int = 50_000) -> None:
        self.url = url
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[tuple[Member, ...], int, int]] = OrderedDict()
        self._seq = 0
        self._flushed = 0  # _seq at the last "forget everything"
        self._changed: dict[tuple[str, str], int] = {}  # (site, equipment) -> _seq of change
        self._listening = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()  # set while listening (tests wait on it)

    # -- the memo ---------------------------------------------------------------------------

    def stamp(self) -> int | None:
        """The counter to stamp a fresh database read with; None while not listening (the
        read must then not be remembered)."""
        with self._lock:
            return self._seq if self._listening else None

    def get(self, key: Hashable) -> tuple[list[Member], int] | None:
        """(members, watermark) for `key` if remembered and unchanged since, else None."""
        with self._lock:
            if not self._listening:
                return None
            entry = self._entries.get(key)
            if entry is None:
                return None
            members, mark, stamp = entry
            if stamp < self._flushed or any(
                self._changed.get((m.site_id, m.equipment_id), 0) > stamp for m in members
            ):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return list(members), mark

    def put(self, key: Hashable, members: list[Member], mark: int, stamp: int | None) -> None:
        """Remember a database read stamped (before it ran) with `stamp()`."""
        if stamp is None:
            return
        with self._lock:
            # Not listening now, or the connection was renewed since the stamp: notifications
            # may have been missed in between, so the read proves nothing about the present.
            if not self._listening or stamp < self._flushed:
                return
            self._entries[key] = (tuple(members), mark, stamp)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def _notified(self, payload: str) -> None:
        with self._lock:
            self._seq += 1
            try:
                site, equipment = json.loads(payload) if payload else (None, None)
            except (ValueError, TypeError):
                site = equipment = None
            if isinstance(site, str) and isinstance(equipment, str):
                self._changed[(site, equipment)] = self._seq
            else:
                self._forget_all()

    def _forget_all(self) -> None:
        """With the lock held: invalidate every entry (stamps before now no longer count)."""
        self._seq += 1
        self._flushed = self._seq
        self._entries.clear()
        self._changed.clear()

    def _set_listening(self, listening: bool) -> None:
        with self._lock:
            # Either way, what was remembered before may have missed notifications.
            self._forget_all()
            self._listening = listening
        if listening:
            self.connected.set()
        else:
            self.connected.clear()

    # -- the listener -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="data-marks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=5, application_name=APPLICATION
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Listening from here on: what committed before is visible to any
                    # query that starts now, and what commits later will be notified.
                    self._set_listening(True)
                    failures = 0
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=PROBE_SECONDS, stop_after=1000):
                            self._notified(note.payload)
                        # The probe finds a connection that died without closing its socket.
                        conn.execute("SELECT 1")
            except psycopg.Error as exc:
                log.warning(
                    "data change listener lost; reading watermarks from the database",
                    error=type(exc).__name__,
                )
            finally:
                self._set_listening(False)
            if not self._stop.is_set():
                self._stop.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1
