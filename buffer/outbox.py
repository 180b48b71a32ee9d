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

Engine state is stored beside the batches and committed in the same transaction: snapshot
rows (`engine_state`, rewritten when the journal is folded) and a journal of what changed
since (`engine_journal`, one row per commit that changed something, with the instant up to
which time was accounted). The outbox stores both as opaque bytes; its caller decides what
goes in.

Tuned for flash (every figure in README "Storage"):
- `secure_delete = OFF`: Debian's SQLite is built with it on, which overwrites every freed
  page with zeros, a second write of everything deleted; the outbox holds ciphertext only.
- `page_size = 1024` for new files: a commit writes whole pages to the WAL, and most commits
  carry about a kilobyte (a batch of one second, a small journal row).
- WAL checkpoints are run by the outbox itself (`wal_autocheckpoint = 0`) after about
  CHECKPOINT_BYTES written, so pages rewritten by many commits reach the database file
  once, and so it knows its fsyncs; `journal_size_limit` keeps the WAL file from staying
  large after a burst.
- Acked batches are deleted together, with a write transaction once the oldest of them has
  waited ACK_DELETE_AFTER_S (or ACK_DELETE_BATCHES are waiting, or at close), not each ack
  in a transaction and fsync of its own; until then they are hidden from `pending()` and
  `stats()`, and a crash before the delete only means they are sent again (the cloud stores
  a batch once).
- A commit that stores engine state records the next sequence number in its journal row
  instead of rewriting the `meta` page as well; opening takes the larger of the two.
- A call with nothing to store commits nothing.
- The batches' totals (rows, events, bytes, sheddable rows) are kept in memory, read from
  the file once at open and moved by every committed insert and delete, so a flush's fill
  check costs the same with an empty outbox and a full one: summing them over the table at
  every flush read all of its leaf pages, about 27 ms of CPU per sum at 100,000 batches
  (218 MB), twice a flush. A commit by another connection (`PRAGMA data_version` changes)
  makes the next read sum them again.
- The WAL file is given its blocks when the outbox opens (`WAL_PREALLOCATE_BYTES`, fallocate),
  so commits overwrite blocks the file already has instead of growing it: a commit that grows
  the file also makes its fdatasync write the file's new size and extents, every time.
  SQLite reads a WAL only up to its last valid frame, so the unused tail is never read.
- The agent opens it with `exclusive=True` (`locking_mode = EXCLUSIVE`, set before the first
  read): SQLite then keeps the WAL index in the process's memory instead of the shared
  `-shm` file, whose pages (its header and the hash slots of a commit's frames) the kernel
  otherwise writes back after every commit: about half of an idle line's bytes. The WAL
  and its fsyncs are unchanged, and the index is rebuilt from the WAL when the file is
  opened after a crash, as it is from a stale `-shm`. The price: no other process can open
  the file while the agent runs (read-only commands ask the agent over its health port,
  agent/outbox_report.py); a reader without `exclusive` uses the shared index as before.

Exceptions: OutboxError <- OutboxFull.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
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
CREATE TABLE IF NOT EXISTS engine_state (key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS engine_journal (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    data BLOB,
    next_seq INTEGER NOT NULL
);
"""

PAGE_SIZE = 1024
# Run a WAL checkpoint once about this much has been written since the last one.
CHECKPOINT_BYTES = 4 * 1024**2
# Without /proc/self/io (not Linux) the checkpoint comes after this many commits instead.
CHECKPOINT_COMMITS = 1000
# After a checkpoint the WAL file is cut back to this size (it stays allocated up to it, so
# the next commits overwrite blocks instead of growing the file).
JOURNAL_SIZE_LIMIT = 8 * 1024**2
# SQLite's page cache for the outbox connection, in KiB. The default (2 MiB) fills with the
# pages of batches as they are written and stays full: while the cloud is unreachable the
# agent's memory would grow by that much, for pages the OS caches anyway. The pages a commit
# or a send touches (the B-tree's spine, the batch at hand) fit in far less.
CACHE_KIB = 256
# Rows `pending` reads by seq in one statement: within every SQLite's limit on a
# statement's parameters (999 before SQLite 3.32).
PENDING_READ_ROWS = 500
# Blocks given to the WAL file at open (below JOURNAL_SIZE_LIMIT, so SQLite keeps them after
# a checkpoint; above CHECKPOINT_BYTES, so a WAL between checkpoints stays inside them).
WAL_PREALLOCATE_BYTES = 5 * 1024**2
ACK_DELETE_AFTER_S = 10.0
ACK_DELETE_BATCHES = 256
# fsyncs SQLite issues (synchronous=FULL, WAL): one per commit, and per checkpoint one of the
# WAL and one of the database, plus one of the new WAL header at the next commit.
FSYNCS_PER_CHECKPOINT = 3

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
class StateWrite:
    """Engine state committed with a flush: a journal row (`entry`, opaque; None for a bare
    heartbeat) recording that time is accounted up to `at`; with `snapshot` the journal is
    folded instead: those rows replace the stored ones (None deletes one), the journal is
    emptied and the new row starts it again."""

    at: int
    entry: bytes | None = None
    snapshot: dict[str, bytes | None] | None = None


@dataclass(frozen=True)
class StoredState:
    """What `load_state()` finds: rows by key, the journal in order, the legacy checkpoint."""

    rows: dict[str, bytes]
    journal: list[tuple[int, bytes | None]]
    legacy: str | None


@dataclass
class WriteCounters:
    """What the outbox wrote to its files since it was opened (see the module docstring)."""

    bytes: int = 0
    fsyncs: int = 0
    commits: int = 0
    checkpoints: int = 0
    sealed_bytes: int = 0
    batches: int = 0
    opened_at: float = field(default_factory=time.monotonic)


# /proc/self/io, kept open: read again with pread at every commit (two reads a commit; an
# open, read and close each time cost about four times as much). A forked child opens its own.
_io: list[int | None] = [None]
_io_lock = threading.Lock()


def _forget_io() -> None:
    fd, _io[0] = _io[0], None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


os.register_at_fork(after_in_child=_forget_io)


def _write_bytes() -> int | None:
    """Bytes this process has caused to be written to storage (Linux), or None."""
    try:
        fd = _io[0]
        if fd is None:
            with _io_lock:
                fd = _io[0]
                if fd is None:
                    fd = _io[0] = os.open("/proc/self/io", os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    at = data.find(b"\nwrite_bytes:")  # a line of its own, not cancelled_write_bytes
    if at < 0:
        return None
    end = data.find(b"\n", at + 13)
    return int(data[at + 13 : end if end >= 0 else None])


@dataclass
class _Totals:
    """Sums over the `batches` table: rows, events, bytes, sheddable rows."""

    rows: int = 0
    events: int = 0
    bytes: int = 0
    sheddable: int = 0

    def add(self, rows: int, events: int, size: int, sheddable: int) -> None:
        self.rows += rows
        self.events += events
        self.bytes += size
        self.sheddable += sheddable


_SUMS = (
    "SELECT COUNT(*), COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0), "
    "COALESCE(SUM(sheddable), 0) FROM batches"
)


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
    oldest_unacked_seq: int | None = None

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
        exclusive: bool = False,
    ) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._clock = clock
        self._free_space = free_space
        self.counters = WriteCounters()
        # Acked batches waiting to be deleted together: seq -> (count, bytes).
        self._acked: dict[int, tuple[int, int]] = {}
        # The batches' totals as of the last commit (see the module docstring), what the
        # open transaction changes in them, and the data_version they were read at.
        self._totals = _Totals()
        self._change = _Totals()
        self._totals_version: int | None = None
        self._acked_since: float | None = None  # monotonic time of the oldest of them
        self._next_seq = 1
        self._since_checkpoint = (0, 0)  # (bytes, commits)
        self._wal_ready = False  # blocks given to the WAL (at the first write: a reader never)
        self._closed = False
        self._epoch: str | None = None  # the file's epoch, read once (it never changes)
        self.open_report = self._open()

    # -- opening ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA busy_timeout = 10000")
        if self.exclusive:
            # Before the first read: the WAL index then lives in this process's memory.
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        # Only takes effect while the file is still empty (a new outbox).
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot switch to WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = OFF")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
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
        self._read_totals()
        if self._meta("epoch") is None:
            with self._tx():
                self._set_meta("epoch", secrets.token_hex(8))
                self._set_meta("next_seq", "1")
                self._set_meta("acked_hwm", "0")
                self._set_meta("acked_total", "0")
        row = self._conn.execute("SELECT MAX(next_seq) FROM engine_journal").fetchone()
        self._next_seq = max(int(self._meta("next_seq") or "1"), int(row[0] or 0))
        return OpenReport(created=created, moved_aside=moved, problem=problem)

    def _data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _read_totals(self) -> None:
        # The version first: a commit between the two reads then only causes another sum.
        version = self._data_version()
        row = self._conn.execute(_SUMS).fetchone()
        self._totals = _Totals(int(row[0]), int(row[1]), int(row[2]), int(row[3]))
        self._totals_version = version

    def _current_totals(self) -> _Totals:
        """The batches' totals as committed; summed again only after another connection's
        commit (an agent holds the file alone: `exclusive`)."""
        if self.exclusive:
            return self._totals
        if self._data_version() != self._totals_version:
            self._read_totals()
        return self._totals

    def _preallocate_wal(self) -> None:
        """Give the WAL file its blocks up front (see the module docstring); best effort."""
        wal = Path(f"{self.path}-wal")
        try:
            fd = os.open(wal, os.O_WRONLY)
        except OSError:
            return  # no WAL yet (SQLite creates it at the first write)
        try:
            if os.fstat(fd).st_size < WAL_PREALLOCATE_BYTES:
                os.posix_fallocate(fd, 0, WAL_PREALLOCATE_BYTES)
                os.fsync(fd)
        except OSError:
            pass  # a file system without fallocate: the WAL grows as before
        finally:
            os.close(fd)

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                shutil.move(src, Path(str(target) + suffix))
        return target

    def close(self) -> None:
        """Delete acked batches, fold the WAL in, close the file; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._acked:
            with contextlib.suppress(sqlite3.Error), self._tx(delete_acked=True):
                pass
        if self.counters.commits:  # a reader (buffer stats beside the agent) writes nothing
            with contextlib.suppress(sqlite3.Error):
                self._checkpoint()
        self._conn.close()

    # -- small helpers ------------------------------------------------------------------

    def _acks_due(self) -> bool:
        since = self._acked_since
        return since is not None and (
            len(self._acked) >= ACK_DELETE_BATCHES or time.monotonic() - since >= ACK_DELETE_AFTER_S
        )

    @contextlib.contextmanager
    def _tx(self, *, delete_acked: bool = False) -> Iterator[sqlite3.Connection]:
        if not self._wal_ready:
            self._wal_ready = True
            self._preallocate_wal()
        before = _write_bytes()
        self._conn.execute("BEGIN IMMEDIATE")
        totals = self._current_totals()  # under the write lock: no other commit until ours
        self._change = _Totals()
        try:
            yield self._conn
            deleted = self._delete_acked() if delete_acked or self._acks_due() else []
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        c = self._change
        totals.add(c.rows, c.events, c.bytes, c.sheddable)
        if deleted:
            for seq in deleted:
                self._acked.pop(seq, None)
            self._acked_since = time.monotonic() if self._acked else None
        self._count_commit(before)

    def _count_commit(self, before: int | None) -> None:
        written = 0
        if before is not None and (after := _write_bytes()) is not None:
            written = after - before
        c = self.counters
        c.commits += 1
        c.fsyncs += 1
        c.bytes += written
        b, n = self._since_checkpoint
        self._since_checkpoint = (b + written, n + 1)
        if b + written >= CHECKPOINT_BYTES or n + 1 >= CHECKPOINT_COMMITS:
            with contextlib.suppress(sqlite3.Error):
                self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file (PASSIVE: never waits for a reader)."""
        before = _write_bytes()
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        after = _write_bytes()
        c = self.counters
        c.checkpoints += 1
        c.fsyncs += FSYNCS_PER_CHECKPOINT
        if before is not None and after is not None:
            c.bytes += after - before
        self._since_checkpoint = (0, 0)

    def _delete_acked(self) -> list[int]:
        """Inside a write transaction: delete the acked batches (see `ack`)."""
        if not self._acked:
            return []
        seqs = sorted(self._acked)
        conn = self._conn
        for i in range(0, len(seqs), 500):
            chunk = seqs[i : i + 500]
            where = f"WHERE seq IN ({','.join('?' * len(chunk))})"
            self._count_deletion(where, chunk)
            conn.execute(f"DELETE FROM batches {where}", chunk)
        hwm = max(int(self._meta("acked_hwm") or "0"), seqs[-1])
        self._set_meta("acked_hwm", str(hwm))
        self._set_meta("acked_total", str(int(self._meta("acked_total") or "0") + len(seqs)))
        return seqs

    def _count_deletion(self, where: str, params: Sequence[object]) -> None:
        """Inside a write transaction, before `DELETE FROM batches {where}`: take the rows it
        will delete out of the totals (by primary key; no RETURNING, which SQLite before
        3.35 lacks)."""
        row = self._conn.execute(f"{_SUMS} {where}", params).fetchone()
        self._change.add(-int(row[0]), -int(row[1]), -int(row[2]), -int(row[3]))

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
        epoch = self._epoch
        if epoch is None:
            epoch = self._meta("epoch")
            if epoch is None:  # written when the outbox is created
                raise RuntimeError("the outbox has no epoch")
            self._epoch = epoch
        return epoch

    def _stored_bytes(self) -> int:
        return self._current_totals().bytes - sum(size for _, size in self._acked.values())

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

    def fill_ratio(self) -> float:
        """`stats().fill_ratio` without the rest of `stats()` (the writer checks it at every
        flush)."""
        stored = self._stored_bytes()
        capacity = self.capacity(stored)
        return 1.0 if capacity <= 0 else stored / capacity

    def has_room(self) -> bool:
        stored = self._stored_bytes()
        return stored < self.capacity(stored)

    # -- the interface ------------------------------------------------------------------

    def append(
        self, batches: Sequence[tuple[int, Sealer] | NewBatch], state: StateWrite | None
    ) -> list[int]:
        """Store sealed batches and the engine state that produced them in ONE transaction.

        `batches` are NewBatch or (event count, sealer); returns the sequence numbers given.
        Raises OutboxFull (nothing stored) when the capacity is reached. With no batch, no
        state and no acked batch to delete, nothing is committed.
        """
        seqs: list[int] = []
        items = [b if isinstance(b, NewBatch) else NewBatch(b[0], b[1]) for b in batches]
        if not items and state is None and not self._acks_due():
            return seqs
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
            next_seq = self._next_seq
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
                self._change.add(1, item.count, len(envelope), int(item.sheddable))
                self.counters.sealed_bytes += len(envelope)
                self.counters.batches += 1
                next_seq += 1
            if state is not None:
                self._store_state(conn, state, next_seq)
            elif seqs:
                self._set_meta("next_seq", str(next_seq))
        self._next_seq = next_seq
        return seqs

    def _store_state(self, conn: sqlite3.Connection, state: StateWrite, next_seq: int) -> None:
        if state.snapshot is not None:
            for key, data in state.snapshot.items():
                if data is None:
                    conn.execute("DELETE FROM engine_state WHERE key = ?", (key,))
                else:
                    conn.execute(
                        "INSERT INTO engine_state(key, data) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET data = excluded.data",
                        (key, data),
                    )
            conn.execute("DELETE FROM engine_journal")
            conn.execute("DELETE FROM checkpoint")  # an older agent's single row, now folded
        conn.execute(
            "INSERT INTO engine_journal(at, data, next_seq) VALUES (?, ?, ?)",
            (state.at, state.entry, next_seq),
        )

    def load_state(self) -> StoredState:
        """The stored engine state: rows, then the journal to apply over them, in order."""
        rows = {
            str(k): bytes(v)
            for k, v in self._conn.execute("SELECT key, data FROM engine_state").fetchall()
        }
        journal = [
            (int(at), None if data is None else bytes(data))
            for at, data in self._conn.execute(
                "SELECT at, data FROM engine_journal ORDER BY id"
            ).fetchall()
        ]
        legacy = self._conn.execute("SELECT data FROM checkpoint WHERE id = 1").fetchone()
        return StoredState(rows, journal, None if legacy is None else str(legacy[0]))

    def pending(
        self, limit: int, *, after_seq: int = 0, skip: Collection[int] = ()
    ) -> list[PendingBatch]:
        """The oldest unacked batches with seq > after_seq, leaving out the seqs in `skip`
        (the uplink's batches in flight).

        The seqs are chosen first, from the primary key alone, and then the rows of the chosen
        ones are read: neither the envelopes of batches in flight nor those of acked batches
        still waiting for their deletion (in a drain, most of the rows ahead) are read. (A
        `NOT IN` on the seq in one query of the rows still read the acked ones: measured, it
        saved nothing.)"""
        chosen: list[int] = []
        while len(chosen) < limit:
            step = limit + len(self._acked) + len(skip)
            seqs = [
                int(r[0])
                for r in self._conn.execute(
                    "SELECT seq FROM batches WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, step)
                )
            ]
            chosen += [q for q in seqs if q not in self._acked and q not in skip]
            if len(seqs) < step:
                break
            after_seq = seqs[-1]
        chosen = chosen[:limit]
        out: list[PendingBatch] = []
        # In parts, each well within SQLite's limit on a statement's parameters.
        for i in range(0, len(chosen), PENDING_READ_ROWS):
            part = chosen[i : i + PENDING_READ_ROWS]
            out += [
                PendingBatch(int(r[0]), int(r[1]), str(r[2]), bytes(r[3]), int(r[4]))
                for r in self._conn.execute(
                    "SELECT seq, count, digest, envelope, created_ms FROM batches "
                    f"WHERE seq IN ({','.join('?' * len(part))}) ORDER BY seq",
                    part,
                )
            ]
        return out

    def ack(self, epoch: str, acked: dict[int, str]) -> list[int]:
        """Take the batches an ack names, only where epoch and digest match what we sent.

        They are gone from `pending()` and `stats()` at once and deleted from the file together
        with others when due (see the module docstring, and `tidy`)."""
        if epoch != self.epoch or not acked:
            return []
        taken: list[int] = []
        for seq, digest in sorted(acked.items()):
            if seq in self._acked:
                continue
            row = self._conn.execute(
                "SELECT count, bytes FROM batches WHERE seq = ? AND digest = ?", (seq, digest)
            ).fetchone()
            if row is not None:
                self._acked[seq] = (int(row[0]), int(row[1]))
                taken.append(seq)
        if taken and self._acked_since is None:
            self._acked_since = time.monotonic()
        return taken

    def tidy(self) -> int:
        """Delete the acked batches if their deletion is due (see `ack`); returns how many.
        The uplink calls it on its rounds, so they go even when nothing else is written."""
        return self.flush_acks() if self._acks_due() else 0

    def flush_acks(self) -> int:
        """Delete the acked batches now (a transaction of its own); returns how many."""
        n = len(self._acked)
        if n:
            with self._tx(delete_acked=True):
                pass
        return n

    def remove_rejected(self, epoch: str, seq: int, digest: str) -> bool:
        """Delete one batch the cloud refused for good (a verified rejection names it).

        The caller records the loss first; only the batch with this exact digest goes."""
        if epoch != self.epoch:
            return False
        with self._tx() as conn:
            self._count_deletion("WHERE seq = ? AND digest = ?", (seq, digest))
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
                if int(seq) in self._acked:
                    continue  # acked: deleted with this transaction anyway
                conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
                self._change.add(-1, -int(count), -int(size), -1)
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
        totals = self._current_totals()
        acked = self._acked
        oldest_row = self._conn.execute(
            "SELECT created_ms, seq FROM batches WHERE seq > ? ORDER BY seq LIMIT 1",
            (self._acked_prefix(),),
        ).fetchone()
        oldest = None if oldest_row is None else max(0.0, self._clock() - oldest_row[0] / 1000)
        free = self._disk_free()
        stored = totals.bytes - sum(size for _, size in acked.values())
        return OutboxStats(
            epoch=self.epoch,
            depth=totals.rows - len(acked),
            events=totals.events - sum(count for count, _ in acked.values()),
            bytes=stored,
            oldest_unacked_age_s=oldest,
            acked_seq_high_water=max(int(self._meta("acked_hwm") or "0"), max(acked, default=0)),
            acked_batches_total=int(self._meta("acked_total") or "0") + len(acked),
            next_seq=self._next_seq,
            max_bytes=self.max_bytes,
            capacity_bytes=min(self.max_bytes, stored + max(0, free - self.min_free_bytes)),
            disk_free_bytes=free,
            min_free_bytes=self.min_free_bytes,
            sheddable_batches=totals.sheddable,
            shed_batches_total=int(self._meta("shed_batches") or "0"),
            shed_events_total=int(self._meta("shed_events") or "0"),
            oldest_unacked_seq=None if oldest_row is None else int(oldest_row[1]),
        )

    def _acked_prefix(self) -> int:
        """The highest seq below which every stored batch is acked (0 when none is)."""
        if not self._acked:
            return 0
        rows = self._conn.execute(
            "SELECT seq FROM batches ORDER BY seq LIMIT ?", (len(self._acked) + 1,)
        ).fetchall()
        prefix = 0
        for (seq,) in rows:
            if int(seq) not in self._acked:
                break
            prefix = int(seq)
        return prefix


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring an outbox written by an older version up to the current schema."""
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(batches)")}
    if "sheddable" not in columns:
        conn.execute("ALTER TABLE batches ADD COLUMN sheddable INTEGER NOT NULL DEFAULT 0")
