"""The durable outbox: sealed batches and the engine checkpoint, committed together.

SQLite in WAL mode with `synchronous=FULL` (NORMAL may lose the last commits on power loss).
One writer. A batch gets its sequence number inside the transaction that stores it, so
`(epoch, seq)` is never reused; `epoch` is a random id of this database file. The outbox
stores opaque bytes: sealing is done by a callable handed in by the caller.

Capacity is the smaller of the byte quota and what the disk can take above the free-space
floor. A write is refused (OutboxFull, nothing stored) once the stored bytes reach the
capacity; a write that starts below it is taken whole, so the capacity is a soft limit
exceeded by at most one flush (splitting a flush would separate events from the checkpoint
that produced them). Batches marked sheddable (raw samples) can be deleted unsent to make
room (`shed`); the caller records that as a loss.

Exceptions: OutboxError <- OutboxFull.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    digest TEXT NOT NULL,
    envelope BLOB NOT NULL,
    sheddable INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), data TEXT NOT NULL);
"""

Sealer = Callable[[str, int], tuple[bytes, str]]
"""(epoch, seq) -> (envelope bytes, digest); called inside the storing transaction."""

DiskFree = Callable[[Path], int]


def disk_free(path: Path) -> int:
    """Bytes available to this process on the file system holding `path`."""
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class NewBatch:
    """One batch to append: its event count, its sealer, and whether it may be shed."""

    count: int
    seal: Sealer
    sheddable: bool = False


@dataclass(frozen=True)
class ShedReport:
    """Batches deleted unsent to make room: a loss the caller must declare."""

    epoch: str
    seqs: list[int]
    events: int
    bytes: int


class OutboxError(Exception):
    """The outbox cannot take the write (see subclasses)."""


class OutboxFull(OutboxError):
    """The byte quota is reached; the caller keeps its data and retries later."""


@dataclass(frozen=True)
class PendingBatch:
    seq: int
    count: int
    digest: str
    envelope: bytes
    created_ms: int


@dataclass(frozen=True)
class OutboxStats:
    epoch: str
    depth: int
    events: int
    bytes: int
    oldest_unacked_age_s: float | None
    acked_seq_high_water: int
    acked_batches_total: int
    next_seq: int
    max_bytes: int
    capacity_bytes: int = 0
    disk_free_bytes: int = 0
    min_free_bytes: int = 0
    sheddable_batches: int = 0
    shed_batches_total: int = 0
    shed_events_total: int = 0

    @property
    def fill_ratio(self) -> float:
        """Stored bytes over capacity (quota, or less when the disk floor is near)."""
        if self.capacity_bytes <= 0:
            return 1.0  # the disk is at its floor: nothing more fits
        return self.bytes / self.capacity_bytes


@dataclass(frozen=True)
class OpenReport:
    """What happened when the file was opened (a corrupt file is moved aside, not fatal)."""

    created: bool
    moved_aside: Path | None
    problem: str | None


def _create_private(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.close(fd)


class Outbox:
    """The single-writer outbox. Not thread-safe: use it from one thread (or the loop)."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = 2 * 1024**3,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        free_space: DiskFree = disk_free,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._clock = clock
        self._free_space = free_space
        self.open_report = self._open()

    # -- opening ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA busy_timeout = 10000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _open(self) -> OpenReport:
        created = not self.path.exists()
        _create_private(self.path)
        moved: Path | None = None
        problem: str | None = None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {result}")
            conn.executescript(SCHEMA)
            _upgrade(conn)
            no_epoch = conn.execute("SELECT 1 FROM meta WHERE key = 'epoch'").fetchone() is None
            if no_epoch and conn.execute("SELECT 1 FROM batches LIMIT 1").fetchone() is not None:
                # Batches without the epoch they were sealed under cannot be resent.
                raise sqlite3.DatabaseError("batches present but no epoch")
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
            if conn is not None:
                conn.close()
            moved = self._move_aside()
            _create_private(self.path)
            conn = self._connect()
            conn.executescript(SCHEMA)
            created = True
        self._conn = conn
        if self._meta("epoch") is None:
            with self._tx():
                self._set_meta("epoch", secrets.token_hex(8))
                self._set_meta("next_seq", "1")
                self._set_meta("acked_hwm", "0")
                self._set_meta("acked_total", "0")
        return OpenReport(created=created, moved_aside=moved, problem=problem)

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                shutil.move(src, Path(str(target) + suffix))
        return target

    def close(self) -> None:
        self._conn.close()

    # -- small helpers ------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @property
    def epoch(self) -> str:
        epoch = self._meta("epoch")
        assert epoch is not None
        return epoch

    def _stored_bytes(self) -> int:
        row = self._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM batches").fetchone()
        return int(row[0])

    def _disk_free(self) -> int:
        try:
            return int(self._free_space(self.path.parent))
        except OSError:
            return 0

    def capacity(self, stored: int | None = None) -> int:
        """Bytes the outbox may hold now: min(quota, stored + free disk above the floor)."""
        stored = self._stored_bytes() if stored is None else stored
        above_floor = max(0, self._disk_free() - self.min_free_bytes)
        return min(self.max_bytes, stored + above_floor)

    def has_room(self) -> bool:
        stored = self._stored_bytes()
        return stored < self.capacity(stored)

    # -- the interface ------------------------------------------------------------------

    def append(
        self, batches: Sequence[tuple[int, Sealer] | NewBatch], checkpoint: str | None
    ) -> list[int]:
        """Store sealed batches and the checkpoint that produced them in ONE transaction.

        `batches` are NewBatch or (event count, sealer); returns the sequence numbers given.
        Raises OutboxFull (nothing stored) when the capacity is reached.
        """
        seqs: list[int] = []
        items = [b if isinstance(b, NewBatch) else NewBatch(b[0], b[1]) for b in batches]
        with self._tx() as conn:
            if items:
                stored = self._stored_bytes()
                capacity = self.capacity(stored)
                if stored >= capacity:
                    raise OutboxFull(
                        f"outbox holds {stored} bytes, capacity {capacity} "
                        f"(quota {self.max_bytes}, free-disk floor {self.min_free_bytes})"
                    )
            epoch = self.epoch
            next_seq = int(self._meta("next_seq") or "1")
            now_ms = int(self._clock() * 1000)
            for item in items:
                envelope, digest = item.seal(epoch, next_seq)
                conn.execute(
                    "INSERT INTO batches(seq, created_ms, count, bytes, digest, envelope, "
                    "sheddable) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        next_seq,
                        now_ms,
                        item.count,
                        len(envelope),
                        digest,
                        envelope,
                        int(item.sheddable),
                    ),
                )
                seqs.append(next_seq)
                next_seq += 1
            if seqs:
                self._set_meta("next_seq", str(next_seq))
            if checkpoint is not None:
                conn.execute(
                    "INSERT INTO checkpoint(id, data) VALUES (1, ?) "
                    "ON CONFLICT(id) DO UPDATE SET data = excluded.data",
                    (checkpoint,),
                )
        return seqs

    def load_checkpoint(self) -> str | None:
        row = self._conn.execute("SELECT data FROM checkpoint WHERE id = 1").fetchone()
        return None if row is None else str(row[0])

    def pending(self, limit: int, *, after_seq: int = 0) -> list[PendingBatch]:
        """The oldest unacked batches with seq > after_seq."""
        rows = self._conn.execute(
            "SELECT seq, count, digest, envelope, created_ms FROM batches "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [PendingBatch(int(r[0]), int(r[1]), str(r[2]), bytes(r[3]), int(r[4])) for r in rows]

    def ack(self, epoch: str, acked: dict[int, str]) -> list[int]:
        """Delete the batches an ack names, only where epoch and digest match what we sent."""
        if epoch != self.epoch or not acked:
            return []
        deleted: list[int] = []
        with self._tx() as conn:
            for seq, digest in sorted(acked.items()):
                cur = conn.execute(
                    "DELETE FROM batches WHERE seq = ? AND digest = ?", (seq, digest)
                )
                if cur.rowcount:
                    deleted.append(seq)
            if deleted:
                hwm = max(int(self._meta("acked_hwm") or "0"), *deleted)
                self._set_meta("acked_hwm", str(hwm))
                total = int(self._meta("acked_total") or "0") + len(deleted)
                self._set_meta("acked_total", str(total))
        return deleted

    def remove_rejected(self, epoch: str, seq: int, digest: str) -> bool:
        """Delete one batch the cloud refused for good (a verified rejection names it).

        The caller records the loss first; only the batch with this exact digest goes."""
        if epoch != self.epoch:
            return False
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM batches WHERE seq = ? AND digest = ?", (seq, digest))
        return bool(cur.rowcount)

    def shed(self, min_bytes: int) -> ShedReport:
        """Delete the oldest sheddable batches, unsent or unacked, until `min_bytes` are freed.

        Returns what was deleted so the caller can declare the loss (nothing is dropped
        silently); OEE, state and count batches are never sheddable.
        """
        epoch = self.epoch
        seqs: list[int] = []
        events = freed = 0
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT seq, count, bytes FROM batches WHERE sheddable = 1 ORDER BY seq"
            ).fetchall()
            for seq, count, size in rows:
                if freed >= min_bytes:
                    break
                conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
                seqs.append(int(seq))
                events += int(count)
                freed += int(size)
            if seqs:
                self._set_meta(
                    "shed_batches", str(int(self._meta("shed_batches") or "0") + len(seqs))
                )
                self._set_meta("shed_events", str(int(self._meta("shed_events") or "0") + events))
        return ShedReport(epoch=epoch, seqs=seqs, events=events, bytes=freed)

    def stats(self) -> OutboxStats:
        row = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0), MIN(created_ms), "
            "COALESCE(SUM(sheddable), 0) FROM batches"
        ).fetchone()
        oldest = None if row[3] is None else max(0.0, self._clock() - int(row[3]) / 1000)
        free = self._disk_free()
        return OutboxStats(
            epoch=self.epoch,
            depth=int(row[0]),
            events=int(row[1]),
            bytes=int(row[2]),
            oldest_unacked_age_s=oldest,
            acked_seq_high_water=int(self._meta("acked_hwm") or "0"),
            acked_batches_total=int(self._meta("acked_total") or "0"),
            next_seq=int(self._meta("next_seq") or "1"),
            max_bytes=self.max_bytes,
            capacity_bytes=min(self.max_bytes, int(row[2]) + max(0, free - self.min_free_bytes)),
            disk_free_bytes=free,
            min_free_bytes=self.min_free_bytes,
            sheddable_batches=int(row[4]),
            shed_batches_total=int(self._meta("shed_batches") or "0"),
            shed_events_total=int(self._meta("shed_events") or "0"),
        )


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring an outbox written by an older version up to the current schema."""
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(batches)")}
    if "sheddable" not in columns:
        conn.execute("ALTER TABLE batches ADD COLUMN sheddable INTEGER NOT NULL DEFAULT 0")
