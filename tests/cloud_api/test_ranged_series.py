"""Days, weeks and months summed per bucket by index range scans (queries.local_buckets and
the ranged statement) give the same buckets and sums as grouping every row by PostgreSQL's
`date_trunc(unit, bucket, zone)`: across DST changes, in zones that change at midnight, with
1-minute edges, for every grouping."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg

from cloud_api.access.auth import Principal
from cloud_api.access.security import SitePool, database_scope
from cloud_api.api import queries
from cloud_api.api.queries import COMPONENT_FIELDS, Member, local_buckets, oee_series
from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool

MEMBERS = [
    Member("plant-a", "m1", "line-1"),
    Member("plant-a", "m2", "line-1"),
    Member("plant-a", "m3", "line-2"),
]
FIRST = datetime(2025, 1, 1, tzinfo=UTC)
LAST = datetime(2026, 2, 1, tzinfo=UTC)
ZONES = (
    "Europe/Berlin",
    "America/Chicago",
    "America/Santiago",  # DST changes at midnight
    "America/Havana",  # at midnight too
    "Asia/Tokyo",
    "Pacific/Apia",
    "UTC",
)

_COMPONENT_VALUES = ", ".join(
    f"(floor(random() * 60))::{'bigint' if c in queries.INTEGER_FIELDS else 'float8'}"
    for c in COMPONENT_FIELDS
)


def _seed(url: str) -> None:
    """Hourly rollups of three machines over 13 months and 1-minute rollups every 13
    minutes (what the windows' edges read); random whole-number components (seeded)."""
    cols = ", ".join(COMPONENT_FIELDS)
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("SELECT setseed(0.25)")
        conn.execute("INSERT INTO registry.sites(site_id) VALUES ('plant-a')")
        for m in MEMBERS:
            conn.execute(
                "INSERT INTO registry.equipment(site_id, equipment_id, line_id) "
                "VALUES (%s, %s, %s)",
                (m.site_id, m.equipment_id, m.line_id),
            )
            for table, step in (("oee_1h", "1 hour"), ("oee_1m", "13 minutes")):
                conn.execute(
                    f"INSERT INTO rollups.{table} (site_id, equipment_id, bucket, {cols}) "
                    f"SELECT %s, %s, t, {_COMPONENT_VALUES} FROM generate_series(%s::timestamptz, "
                    f"%s::timestamptz - interval '1 second', %s::interval) t",
                    (m.site_id, m.equipment_id, FIRST, LAST, step),
                )


def _buckets(series: queries.Series) -> list[tuple[object, ...]]:
    return [
        (b.group, b.start, b.end, tuple(getattr(b.components, c) for c in COMPONENT_FIELDS))
        for b in series.buckets
    ]


def test_ranged_sums_equal_date_trunc_grouping(pg_url: str) -> None:
    _seed(pg_url)
    rng = random.Random(11)
    cases: list[tuple[datetime, datetime, str, str]] = []

    # Around each DST change of the zones (and across it by a month), at odd hours.
    def utc(*args: int) -> datetime:
        return datetime(*args, tzinfo=UTC)  # type: ignore[misc]

    changes = {
        "Europe/Berlin": (utc(2025, 3, 30, 1), utc(2025, 10, 26, 1)),
        "America/Santiago": (utc(2025, 4, 6, 3), utc(2025, 9, 7, 4)),
        "America/Havana": (utc(2025, 3, 9, 5), utc(2025, 11, 2, 5)),
    }
    for zone, instants in changes.items():
        for at in instants:
            for hours in (-30, 0, 5):
                for days in (3, 45):
                    start = at + timedelta(hours=hours)
                    cases.append((start, start + timedelta(days=days), zone, rng.choice("dwm")))
    # Random windows: whole hours (hourly rollups only) and odd minutes (1-minute edges).
    for _ in range(30):
        start = FIRST + timedelta(minutes=rng.randrange(0, 330 * 24 * 60))
        if rng.random() < 0.5:
            start = start.replace(minute=0)
        end = min(LAST, start + timedelta(hours=rng.randrange(1, 24 * 100)))
        cases.append((start, end, rng.choice(ZONES), rng.choice("dwm")))
    # One machine's year by month and the plant's 30 days by day, as the benchmark asks.
    berlin_year = (datetime(2024, 12, 31, 23, tzinfo=UTC), datetime(2025, 12, 31, 23, tzinfo=UTC))
    cases.append((*berlin_year, "Europe/Berlin", "m"))
    cases.append((datetime(2025, 5, 31, 22, tzinfo=UTC), datetime(2025, 6, 30, 22, tzinfo=UTC),
                  "Europe/Berlin", "d"))  # fmt: skip

    ranged = 0
    with psycopg.connect(pg_url) as conn:
        for start, end, zone, unit in cases:
            tz = ZoneInfo(zone)
            interval: queries.Interval = {"d": "1d", "w": "1w", "m": "1mo"}[unit]  # type: ignore[assignment]
            for group_by in ("none", "line", "equipment"):
                members = MEMBERS if group_by != "none" else rng.sample(MEMBERS, rng.randint(1, 3))
                members = sorted(members, key=lambda m: m.equipment_id)
                args = (conn, members, start, end, interval, tz, group_by)
                fast = oee_series(*args, marked=True, with_targets=True)
                grouped = oee_series(*args, marked=True, with_targets=True, ranged=False)
                assert _buckets(fast) == _buckets(grouped), (zone, interval, start, end)
                assert (fast.source, fast.mark, fast.targets) == (
                    grouped.source, grouped.mark, grouped.targets,
                )  # fmt: skip
                assert fast.buckets, (zone, interval, start, end)
            many = len(members) * (end - start).total_seconds() >= queries.RANGED_MIN_ROWS * 3600
            ranged += many and local_buckets(start, end, interval, tz) is not None
    # Most cases did go by ranges (the rest: short windows, a skipped or repeated midnight).
    assert ranged > len(cases) // 2


def test_local_buckets_stop_at_a_skipped_or_repeated_midnight() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    days = local_buckets(
        datetime(2025, 3, 29, 12, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC), "1d", berlin
    )
    assert days == [
        datetime(2025, 3, 28, 23, tzinfo=UTC),
        datetime(2025, 3, 29, 23, tzinfo=UTC),
        datetime(2025, 3, 30, 22, tzinfo=UTC),
        datetime(2025, 3, 31, 22, tzinfo=UTC),
    ]
    weeks = local_buckets(
        datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 20, tzinfo=UTC), "1w", berlin
    )
    assert weeks == [
        datetime(2024, 12, 29, 23, tzinfo=UTC) + timedelta(days=7 * i) for i in range(4)
    ]
    # Santiago skips 00:00-01:00 on 2025-09-07: that midnight has no instant.
    santiago = ZoneInfo("America/Santiago")
    start = datetime(2025, 9, 5, 12, tzinfo=UTC)
    assert local_buckets(start, start + timedelta(days=4), "1d", santiago) is None
    assert local_buckets(start, start + timedelta(days=1), "1d", santiago) is not None
    assert local_buckets(start, start + timedelta(hours=3), "1h", santiago) is None


def test_generic_plans_give_the_same_series(pg_url: str) -> None:
    """The series routes' checkouts run the generic plan of every shape of the series
    statement (SitePool.connection(generic_plans=True)); it gives the same buckets, sums,
    watermark and targets as the custom plans PostgreSQL chooses by itself."""
    _seed(pg_url)
    rng = random.Random(5)
    # Every statement prepared at once, so both connections run prepared statements.
    settings = DatabaseSettings(url=pg_url, pool_min=1, pool_max=1, prepare_threshold=0)
    pool = SitePool(make_pool(settings, name="plans", prepare=True), "gateway_api")
    berlin = ZoneInfo("Europe/Berlin")
    utc, santiago = ZoneInfo("UTC"), ZoneInfo("America/Santiago")

    def at(*args: int) -> datetime:
        return datetime(*args, tzinfo=UTC)  # type: ignore[misc]

    cases: list[tuple[datetime, datetime, queries.Interval, ZoneInfo]] = [
        (at(2025, 3, 3), at(2025, 3, 10), "1d", utc),  # the benchmark's week
        (at(2024, 12, 31, 23), at(2025, 12, 31, 23), "1mo", berlin),  # ranged
        (at(2025, 5, 31, 22), at(2025, 6, 30, 22), "1d", berlin),
        (at(2025, 6, 2, 7, 13), at(2025, 6, 9, 5, 52), "1h", berlin),  # 1-minute edges
        (at(2025, 3, 29, 12), at(2025, 4, 2), "1w", berlin),
        (at(2025, 8, 1, 6, 4), at(2025, 8, 1, 11), "15m", berlin),
        (at(2025, 8, 1, 6, 4), at(2025, 8, 1, 8), "1m", berlin),
        (at(2025, 9, 5, 12), at(2025, 9, 9), "1d", santiago),  # a skipped midnight
    ]
    everyone = Principal("t", "viewer", None, "token", "plans")
    try:
        with database_scope(everyone):
            # Twice each: the second time, the statements are prepared and their plans cached.
            for start, end, interval, tz in cases * 2:
                for group_by in ("none", "line", "equipment"):
                    members = sorted(
                        rng.sample(MEMBERS, rng.randint(1, 3)), key=lambda m: m.equipment_id
                    )
                    got = []
                    for generic in (True, False):
                        with pool.connection(generic_plans=generic) as conn:
                            got.append(
                                oee_series(
                                    conn,
                                    members,
                                    start,
                                    end,
                                    interval,
                                    tz,
                                    group_by,
                                    marked=True,
                                    with_targets=True,
                                )
                            )
                    generic_series, custom_series = got
                    assert _buckets(generic_series) == _buckets(custom_series), (start, interval)
                    assert generic_series.buckets, (start, interval)
                    assert (generic_series.mark, generic_series.targets) == (
                        custom_series.mark, custom_series.targets,
                    )  # fmt: skip
            with pool.connection() as conn:
                generic_runs, custom_runs = conn.execute(
                    "SELECT sum(generic_plans), sum(custom_plans) FROM pg_prepared_statements "
                    "WHERE statement LIKE 'WITH scope AS%'"
                ).fetchone() or (0, 0)
        # Half of the executions ran a generic plan, the other half whatever the server chose.
        assert generic_runs >= len(cases) * 3
        assert custom_runs > 0
    finally:
        pool.close()
