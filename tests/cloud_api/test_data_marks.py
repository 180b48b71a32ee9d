"""The in-memory scope/watermark memo (cloud_api/marks.py) against a real PostgreSQL: change
notifications from the 0004/0022 triggers invalidate exactly what they touch (equipment and
day), a stamp older than
a change is never remembered, and a lost listening connection sends every lookup back to the
database until it listens again (and forgets what it knew before)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import date

import psycopg
import pytest

from cloud_api.api.cache import APPLICATION, DataMarks
from cloud_api.api.queries import Member

A1 = Member("site-a", "m1", "line-1")
A2 = Member("site-a", "m2", "line-1")
KEY1 = ("equipment", "m1", None, None, date(2025, 1, 1), date(2025, 1, 7))
KEY2 = ("equipment", "m2", None, None, date(2025, 1, 1), date(2025, 1, 7))


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for something another thread does; the limit only ends a broken test."""
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.01)


@pytest.fixture
def marks(pg_url: str) -> Iterator[DataMarks]:
    m = DataMarks(pg_url)
    m.start()
    assert m.connected.wait(20)
    yield m
    m.stop()


def bump(pg_url: str, site: str, equipment: str, day: date = date(2025, 1, 3)) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO rollups.data_versions AS v (site_id, equipment_id, day, version) "
            "VALUES (%s, %s, %s, nextval('rollups.data_version_seq')) "
            "ON CONFLICT (site_id, equipment_id, day) DO UPDATE SET version = excluded.version",
            (site, equipment, day),
        )


def test_a_data_change_invalidates_only_the_scopes_it_touches(
    pg_url: str, marks: DataMarks
) -> None:
    marks.put(KEY1, [A1], 5, marks.stamp())
    marks.put(KEY2, [A2], 6, marks.stamp())
    assert marks.get(KEY1) == ([A1], 5)
    bump(pg_url, "site-a", "m1")  # committed: notified at commit
    eventually(lambda: marks.get(KEY1) is None, "m1's entry invalidated")
    assert marks.get(KEY2) == ([A2], 6)


def test_a_change_invalidates_only_windows_touching_its_day(pg_url: str, marks: DataMarks) -> None:
    week = (date(2025, 1, 1), date(2025, 1, 7))
    later = (date(2025, 1, 8), date(2025, 1, 14))
    key_later = (*KEY1[:4], *later)
    marks.put(KEY1, [A1], 5, marks.stamp(), week)
    marks.put(key_later, [A1], 7, marks.stamp(), later)
    stamp = marks.stamp()
    bump(pg_url, "site-a", "m1", date(2025, 1, 10))  # live data for a day of the later week
    eventually(lambda: marks.stamp() != stamp, "notification arrived")
    assert marks.get(KEY1) == ([A1], 5)  # the earlier week's watermark still holds
    assert marks.get(key_later) is None
    # An entry without a span is forgotten by a change on any day of its members.
    marks.put(KEY2, [A2], 6, marks.stamp())
    stamp = marks.stamp()
    bump(pg_url, "site-a", "m2", date(2030, 6, 1))
    eventually(lambda: marks.stamp() != stamp, "notification arrived")
    assert marks.get(KEY2) is None


def test_scope_members_are_remembered_until_the_registry_changes(
    pg_url: str, marks: DataMarks
) -> None:
    scope = ("site", "site-a", None, None)
    marks.put_members(scope, [A1, A2], marks.stamp())
    stamp = marks.stamp()
    bump(pg_url, "site-a", "m1")  # data changes leave members alone
    eventually(lambda: marks.stamp() != stamp, "notification arrived")
    assert marks.get_members(scope) == [A1, A2]
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO registry.sites(site_id) VALUES ('site-new')")
    eventually(lambda: marks.get_members(scope) is None, "members forgotten")


def test_a_rolled_back_change_notifies_nothing(pg_url: str, marks: DataMarks) -> None:
    stamp = marks.stamp()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO rollups.data_versions VALUES ('site-a', 'm1', '2025-01-03', 1)")
        conn.rollback()
    bump(pg_url, "site-b", "other")  # a later commit, to know the first would have arrived
    eventually(lambda: marks.stamp() != stamp, "the later notification arrived")
    marks.put(KEY1, [A1], 5, marks.stamp())
    assert marks.get(KEY1) == ([A1], 5)


def test_a_read_stamped_before_a_change_is_not_remembered(pg_url: str, marks: DataMarks) -> None:
    stamp = marks.stamp()  # as a route does before its query
    bump(pg_url, "site-a", "m1")  # the change commits while the "query" runs
    eventually(lambda: marks.stamp() != stamp, "notification arrived")
    marks.put(KEY1, [A1], 5, stamp)
    assert marks.get(KEY1) is None


def test_a_registry_change_forgets_everything(pg_url: str, marks: DataMarks) -> None:
    marks.put(KEY1, [A1], 5, marks.stamp())
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO registry.sites(site_id) VALUES ('site-new')")
    eventually(lambda: marks.get(KEY1) is None, "entry forgotten after a registry change")


def test_a_lost_listener_falls_back_to_the_database_and_forgets(
    pg_url: str, marks: DataMarks
) -> None:
    marks.put(KEY1, [A1], 5, marks.stamp())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (APPLICATION,),
        ).fetchall()
    assert killed == [(True,)]
    eventually(lambda: not marks.connected.is_set() or marks.get(KEY1) is None, "loss seen")
    # While disconnected nothing is answered from memory and nothing is remembered; once it
    # listens again, what it knew before the loss stays forgotten.
    if not marks.connected.is_set():
        assert marks.stamp() is None
        assert marks.get(KEY1) is None
    assert marks.connected.wait(20)
    assert marks.get(KEY1) is None
    marks.put(KEY2, [A2], 6, marks.stamp())
    assert marks.get(KEY2) == ([A2], 6)


def test_an_unreachable_database_answers_nothing_from_memory() -> None:
    m = DataMarks("postgresql://postgres@127.0.0.1:1/none")
    m.start()
    try:
        m.put(KEY1, [A1], 5, m.stamp())
        assert m.stamp() is None
        assert m.get(KEY1) is None
    finally:
        m.stop()
