"""The outbox on real SQLite files: capacity, shedding, acks, corruption, alarms, loss records."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.outbox_writer import OutboxWriter, fill_level
from buffer.outbox import PENDING_READ_ROWS, NewBatch, Outbox, OutboxFull, StateWrite
from oee.events import AgentEvent, CountEvent, Event, SampleEvent, load_events

NOW = datetime(2026, 1, 5, 6, tzinfo=UTC)


def blob_sealer(size: int, tag: bytes = b"x"):  # type: ignore[no-untyped-def]
    def seal(epoch: str, seq: int) -> tuple[bytes, str]:
        raw = tag * size
        return raw, f"{epoch}-{seq}"

    return seal


def state(tag: str) -> StateWrite:
    return StateWrite(at=1, entry=tag.encode())


def last_state(box: Outbox) -> bytes | None:
    return box.load_state().journal[-1][1]


def test_sequence_numbers_survive_reopen_and_epoch_is_stable(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert box.append([(1, blob_sealer(10)), (1, blob_sealer(10))], state("cp1")) == [1, 2]
    epoch = box.epoch
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert box.epoch == epoch and last_state(box) == b"cp1"
    assert box.append([(1, blob_sealer(10))], state("cp2")) == [3]
    assert (tmp_path / "o.db").stat().st_mode & 0o077 == 0


def test_quota_refuses_whole_writes_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=1000, min_free_bytes=0)
    box.append([(1, blob_sealer(600))], state("cp1"))
    box.append([(1, blob_sealer(600))], state("cp2"))  # started below the quota: taken whole
    with pytest.raises(OutboxFull):
        box.append([(1, blob_sealer(10))], state("cp3"))
    assert last_state(box) == b"cp2" and box.stats().depth == 2
    box.ack(box.epoch, {1: f"{box.epoch}-1", 2: f"{box.epoch}-2"})
    assert box.append([(1, blob_sealer(10))], state("cp3")) == [3]


def test_free_disk_floor_counts_as_full(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    box = Outbox(tmp_path / "o.db", min_free_bytes=free + 10**12)  # the real disk is "full"
    assert not box.has_room() and box.stats().fill_ratio >= 1.0
    with pytest.raises(OutboxFull):
        box.append([(1, blob_sealer(10))], None)
    box.min_free_bytes = 0  # space returns
    assert box.append([(1, blob_sealer(10))], None) == [1]


def test_ack_deletes_only_matching_epoch_and_digest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.append([(1, blob_sealer(10)), (1, blob_sealer(10))], None)
    e = box.epoch
    assert box.ack("other-epoch", {1: f"{e}-1"}) == []
    assert box.ack(e, {1: "wrong", 2: f"{e}-2"}) == [2]
    assert box.ack(e, {2: f"{e}-2"}) == []  # a replayed ack deletes nothing more
    stats = box.stats()
    assert (stats.depth, stats.acked_seq_high_water, stats.acked_batches_total) == (1, 2, 1)


def test_shed_deletes_only_sheddable_batches_oldest_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.append(
        [
            NewBatch(3, blob_sealer(100), sheddable=True),
            NewBatch(5, blob_sealer(100)),
            NewBatch(4, blob_sealer(100), sheddable=True),
        ],
        None,
    )
    report = box.shed(150)
    assert (report.seqs, report.events, report.bytes) == ([1, 3], 7, 200)
    assert [b.seq for b in box.pending(10)] == [2]
    assert box.shed(10).seqs == []  # OEE data is never shed
    stats = box.stats()
    assert (stats.shed_batches_total, stats.shed_events_total) == (2, 7)


def test_corrupt_file_is_moved_aside_with_a_new_epoch(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    box.append([(1, blob_sealer(5000))], None)
    old_epoch = box.epoch
    box.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as fh:
        fh.seek(0)
        fh.write(b"\xff" * 200)
    box = Outbox(path)
    assert box.open_report.moved_aside is not None and box.open_report.problem
    assert box.open_report.moved_aside.exists()
    assert box.epoch != old_epoch and box.stats().depth == 0
    assert box.append([(1, blob_sealer(5))], None) == [1]


def test_old_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "CREATE TABLE batches (seq INTEGER PRIMARY KEY, created_ms INTEGER NOT NULL,"
            " count INTEGER NOT NULL, bytes INTEGER NOT NULL, digest TEXT NOT NULL,"
            " envelope BLOB NOT NULL);"
            "INSERT INTO meta VALUES ('epoch', 'e0'), ('next_seq', '2');"
            "INSERT INTO batches VALUES (1, 0, 1, 1, 'd', x'00');"
        )
    box = Outbox(path)
    assert box.epoch == "e0" and box.stats().sheddable_batches == 0
    assert box.append([NewBatch(1, blob_sealer(1), sheddable=True)], None) == [2]


# -- the writer: policies, alarms and loss records --------------------------------------------


def json_sealer(events: list[Event]):  # type: ignore[no-untyped-def]
    from oee.events import dump_events

    raw = dump_events(events)

    def seal(epoch: str, seq: int) -> tuple[bytes, str]:
        return raw, f"{epoch}-{seq}"

    return seal


def sample(i: int) -> Event:
    return SampleEvent(
        agent_id="a", site_id="s", equipment_id="p", ts=NOW, signal="total_count", value=i
    )


def count() -> Event:
    return CountEvent(agent_id="a", site_id="s", equipment_id="p", ts=NOW, produced=1)


def stored_events(box: Outbox) -> list[Event]:
    return [e for b in box.pending(1000) for e in load_events(b.envelope)]


def test_block_holds_everything_until_space_returns(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=4000, min_free_bytes=0)
    writer = OutboxWriter(box, json_sealer, agent_id="a", site_id="s", batch_max_events=50)
    held: list[Event] = []
    for i in range(40):
        result = writer.write([*held, count(), sample(i)], state(f"cp{i}"), NOW)
        held = result.held
        if held:
            break
    assert held, "the quota was reached"
    assert writer.level == "full"
    codes = [e.code for e in stored_events(box) if isinstance(e, AgentEvent)]
    assert "outbox_fill" in codes  # the 70 % / 90 % alarms were committed while there was room
    box.ack(box.epoch, {b.seq: b.digest for b in box.pending(1000)})
    result = writer.write(held, state("cp-final"), NOW)
    assert result.held == [] and last_state(box) == b"cp-final"
    after = stored_events(box)
    assert sum(isinstance(e, CountEvent) for e in after) == sum(
        isinstance(e, CountEvent) for e in held
    )


def test_shed_samples_drops_only_samples_and_records_the_loss(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=4000, min_free_bytes=0)
    writer = OutboxWriter(
        box, json_sealer, agent_id="a", site_id="s", batch_max_events=50, when_full="shed_samples"
    )
    counts_written = 0
    for i in range(60):
        result = writer.write([count(), sample(i)], state(f"cp{i}"), NOW)
        assert not result.held or all(not isinstance(e, SampleEvent) for e in result.held)
        counts_written += 1
        if result.shed_events:
            break
    assert writer.shed_events_total > 0
    events = stored_events(box)
    losses = [e for e in events if isinstance(e, AgentEvent) and e.code == "data_shed"]
    assert len(losses) == 1 and losses[0].data["events"] == writer.shed_events_total
    assert losses[0].data["epoch"] == box.epoch and losses[0].data["seqs"]
    assert sum(isinstance(e, CountEvent) for e in events) == counts_written  # none shed


def test_fill_levels() -> None:
    assert [fill_level(f, full=False) for f in (0.1, 0.7, 0.95, 1.2)] == [
        "ok",
        "warning",
        "critical",
        "full",
    ]
    assert fill_level(0.1, full=True) == "full"


def test_acks_delete_together_with_a_later_write_not_in_a_transaction_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import buffer.outbox as outbox_module

    path = tmp_path / "o.db"
    box = Outbox(path)
    box.append([(1, blob_sealer(10)), (1, blob_sealer(10)), (1, blob_sealer(10))], None)
    e = box.epoch
    commits = box.counters.commits
    assert box.ack(e, {1: f"{e}-1", 2: f"{e}-2"}) == [1, 2]
    assert box.counters.commits == commits, "an ack alone commits nothing"
    assert [b.seq for b in box.pending(10)] == [3]
    stats = box.stats()
    assert (stats.depth, stats.acked_batches_total, stats.acked_seq_high_water) == (1, 2, 2)

    def rows() -> list[int]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return [r[0] for r in conn.execute("SELECT seq FROM batches ORDER BY seq")]

    assert rows() == [1, 2, 3]  # a crash now: they are sent again, the cloud stores them once
    box.append([(1, blob_sealer(10))], None)  # not due yet: the write leaves them
    assert rows() == [1, 2, 3, 4]
    monkeypatch.setattr(outbox_module, "ACK_DELETE_AFTER_S", 0.0)
    box.append([], None)  # due: a commit of its own, with nothing else to store
    assert rows() == [3, 4]
    box.close()
    box = Outbox(path)
    stats = box.stats()
    assert (stats.depth, stats.acked_batches_total, stats.next_seq) == (2, 2, 5)
    assert box.append([(1, blob_sealer(10))], None) == [5]


def test_a_new_outbox_has_small_pages_and_no_secure_delete(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert box._conn.execute("PRAGMA page_size").fetchone()[0] == 1024
    assert box._conn.execute("PRAGMA secure_delete").fetchone()[0] == 0
    assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    box.close()


def test_nothing_to_store_commits_nothing(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    commits = box.counters.commits
    assert box.append([], None) == []
    assert box.counters.commits == commits
    box.close()


def test_the_wal_gets_its_blocks_at_the_first_write_and_commits_in_it_survive_a_crash(
    tmp_path: Path,
) -> None:
    from buffer.outbox import WAL_PREALLOCATE_BYTES

    path = tmp_path / "o.db"
    wal = Path(f"{path}-wal")
    box = Outbox(path)
    box.append([(1, blob_sealer(10))], state("cp1"))
    assert wal.stat().st_size >= WAL_PREALLOCATE_BYTES
    reader = Outbox(path)  # a read-only command beside the writer gives nothing to the WAL
    reader_size = wal.stat().st_size
    assert reader.stats().depth == 1
    reader.close()
    assert wal.stat().st_size == reader_size
    box.append([(1, blob_sealer(10)), (1, blob_sealer(20))], state("cp2"))
    # A crash (no close, no checkpoint): a copy of the files as they are, with the WAL's
    # unused tail of zeros after its last frame, opens with every commit and nothing else.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{path}{suffix}", crashed / f"o.db{suffix}")
    again = Outbox(crashed / "o.db")
    assert [b.seq for b in again.pending(10)] == [1, 2, 3]
    assert last_state(again) == b"cp2"
    assert again.append([(1, blob_sealer(10))], state("cp3")) == [4]
    again.close()
    box.close()


WRITER = """
import sys, time
from buffer.outbox import Outbox, StateWrite
box = Outbox(sys.argv[1], exclusive=True)
for i in range(1, 6):
    box.append([(1, lambda epoch, seq: (b"e" * 3000, f"{epoch}-{seq}"))],
               StateWrite(at=i, entry=f"cp{i}".encode()))
print("committed", flush=True)
time.sleep(600)
"""


def test_an_exclusive_outbox_keeps_its_wal_index_in_memory_and_its_commits_survive_kill_9(
    tmp_path: Path,
) -> None:
    """The agent's outbox (`exclusive=True`): no `-shm` file, no other process can open the
    file while it runs, and what it committed is all there after a kill -9 (the WAL index is
    rebuilt from the WAL), for an exclusive and a shared opener alike."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "o.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "committed"
        assert not Path(f"{path}-shm").exists()
        with (
            pytest.raises(sqlite3.OperationalError, match="locked"),
            contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)) as c,
        ):
            c.execute("SELECT count(*) FROM batches").fetchone()
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
        if writer.stdout is not None:
            writer.stdout.close()
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{path}{suffix}", crashed / f"o.db{suffix}")
    shared = Outbox(crashed / "o.db")
    assert [b.seq for b in shared.pending(10)] == [1, 2, 3, 4, 5]
    assert [entry for _, entry in shared.load_state().journal] == [
        f"cp{i}".encode() for i in range(1, 6)
    ]
    shared.close()
    again = Outbox(path, exclusive=True)
    assert [b.seq for b in again.pending(10)] == [1, 2, 3, 4, 5]
    assert last_state(again) == b"cp5"
    assert again.append([(1, blob_sealer(10))], state("cp6")) == [6]
    again.close()
    reader = Outbox(path)
    assert reader.stats().depth == 6 and last_state(reader) == b"cp6"
    reader.close()


def _sums_over(conn: sqlite3.Connection) -> tuple[int, int, int, int]:
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0), "
        "COALESCE(SUM(sheddable), 0) FROM batches"
    ).fetchone()
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def _sums(path: Path) -> tuple[int, int, int, int]:
    """The batches' totals summed over the file by a connection of its own."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return _sums_over(conn)


def _totals(box: Outbox) -> tuple[int, int, int, int]:
    """What `stats()` reports, with the acked batches it hides added back."""
    s = box.stats()
    acked = box._acked.values()
    return (
        s.depth + len(acked),
        s.events + sum(n for n, _ in acked),
        s.bytes + sum(b for _, b in acked),
        s.sheddable_batches,
    )


_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"), st.lists(st.tuples(st.integers(1, 9), st.booleans()), max_size=4)
        ),
        st.tuples(st.just("ack"), st.lists(st.integers(1, 40), max_size=5)),
        st.tuples(st.just("tidy"), st.just([])),
        st.tuples(st.just("shed"), st.integers(1, 400)),
        st.tuples(st.just("reject"), st.integers(1, 40)),
        st.tuples(st.just("fail"), st.integers(1, 3)),
        st.tuples(st.just("reopen"), st.just([])),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, exclusive=st.booleans())
def test_the_totals_kept_in_memory_are_the_files_sums_after_any_operation(
    ops: list[tuple[str, Any]], exclusive: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import buffer.outbox as outbox_module

    path = tmp_path_factory.mktemp("totals") / "o.db"
    box = Outbox(path, exclusive=exclusive)
    outbox_module_due = outbox_module.ACK_DELETE_AFTER_S
    try:
        for i, (op, arg) in enumerate(ops):
            if op == "append":
                size = 10 + 7 * i
                box.append(
                    [NewBatch(n, blob_sealer(size), sheddable=shed) for n, shed in arg], None
                )
            elif op == "ack":
                box.ack(box.epoch, {seq: f"{box.epoch}-{seq}" for seq in arg})
            elif op == "tidy":
                outbox_module.ACK_DELETE_AFTER_S = 0.0
                box.tidy()
                outbox_module.ACK_DELETE_AFTER_S = outbox_module_due
            elif op == "shed":
                box.shed(arg)
            elif op == "reject":
                box.remove_rejected(box.epoch, arg, f"{box.epoch}-{arg}")
            elif op == "fail":  # a sealer fails after `arg` batches were inserted: rolled back

                def broken(epoch: str, seq: int) -> tuple[bytes, str]:
                    raise RuntimeError("sealing failed")

                with pytest.raises(RuntimeError):
                    box.append([NewBatch(1, blob_sealer(50))] * arg + [NewBatch(1, broken)], None)
            elif op == "reopen":
                box.close()
                box = Outbox(path, exclusive=exclusive)
            assert _totals(box) == _sums_of(box, path, exclusive)
        box.close()
        reopened = Outbox(path)
        assert _totals(reopened) == _sums(path)
        reopened.close()
    finally:
        outbox_module.ACK_DELETE_AFTER_S = outbox_module_due


def _sums_of(box: Outbox, path: Path, exclusive: bool) -> tuple[int, int, int, int]:
    if not exclusive:
        return _sums(path)
    # An exclusive outbox's file cannot be opened beside it: sum over its own connection.
    return _sums_over(box._conn)


def test_a_reader_sees_the_totals_another_connection_commits(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    writer = Outbox(path)
    reader = Outbox(path)
    assert reader.stats().depth == 0
    writer.append(
        [NewBatch(3, blob_sealer(100)), NewBatch(4, blob_sealer(50), sheddable=True)], None
    )
    s = reader.stats()
    assert (s.depth, s.events, s.bytes, s.sheddable_batches) == (2, 7, 150, 1)
    e = writer.epoch
    writer.ack(e, {1: f"{e}-1"})
    writer.flush_acks()  # deleted by the writer: the reader's next read sums again
    s = reader.stats()
    assert (s.depth, s.events, s.bytes, s.sheddable_batches) == (1, 4, 50, 1)
    assert _totals(reader) == _totals(writer) == _sums(path)
    writer.close()
    reader.close()


@settings(max_examples=60, deadline=None)
@given(
    batches=st.integers(0, 40),
    acked=st.sets(st.integers(1, 40)),
    skip=st.sets(st.integers(1, 45)),
    limit=st.integers(1, 20),
    after=st.integers(0, 40),
)
def test_pending_is_the_oldest_unacked_batches_not_skipped(
    batches: int, acked: set[int], skip: set[int], limit: int, after: int
) -> None:
    """What the uplink asks for (the oldest unacked batches not in flight) is exactly the
    file's batches after `after_seq`, without the acked ones and the ones in flight."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "o.db"
        box = Outbox(path)
        try:
            box.append([(1, blob_sealer(5, bytes([65 + i % 26]))) for i in range(batches)], None)
            e = box.epoch
            taken = set(box.ack(e, {seq: f"{e}-{seq}" for seq in acked if seq <= batches}))
            with contextlib.closing(sqlite3.connect(path)) as reader:
                rows = reader.execute(
                    "SELECT seq, count, digest, envelope, created_ms FROM batches "
                    "WHERE seq > ? ORDER BY seq",
                    (after,),
                ).fetchall()
            every = [tuple(r) for r in rows if r[0] not in taken and r[0] not in skip]
            got = box.pending(limit, after_seq=after, skip=skip)
            assert [(b.seq, b.count, b.digest, b.envelope, b.created_ms) for b in got] == (
                every[:limit]
            )
        finally:
            box.close()


def test_pending_reads_more_batches_than_a_statement_takes_parameters(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    try:
        n = 2 * PENDING_READ_ROWS + 3
        box.append([(1, blob_sealer(5, b"x")) for _ in range(n)], None)
        assert [b.seq for b in box.pending(n + 10, skip={2})] == [1, *range(3, n + 1)]
    finally:
        box.close()
