"""Ingest: verify, decrypt, validate and store batches exactly once, then ack them.

Order per batch: size -> header -> agent -> signature (before decryption) -> decrypt ->
topic/site -> schema -> one PostgreSQL transaction (batch key, events, sequence row, OEE
buckets, rollups; the per-batch statements are the functions of migration 0040; a batch
without configuration reports or loss records is one call, ops.ingest_batch of migration
0041, that is its own transaction) -> commit -> signed ack. The batches of one (agent,
epoch) that a worker takes off the queue in the same round share that transaction
(BatchWriter.store_group); each is stored as it would be alone, and if the shared
transaction fails each is stored in its own. Anything refused is counted by reason and kept
in ops.quarantine; no message can stop the worker. A refusal is charged to the agent its
header names only once the agent's signature has verified that header; before that it is
counted under the topic it arrived on, marked unverified (a forged frame cannot raise
another agent's counts).

Permanent versus transient: a signed batch that can never be stored (content the event model
refuses, values or characters PostgreSQL refuses, a key reused with other content) is kept
whole in quarantine and answered, after that commit, with a rejection signed like an ack and
naming (agent, epoch, seq, digest) and the reason; the agent then records the loss and drops
the batch. Database outages, serialization failures and deadlocks are retried and never
answered; an unexpected error is kept in quarantine as `internal_error`, unanswered (the
agent resends it).

A resent batch that is already stored is re-acked (its first ack may have been lost) and
counted as `replay`. Before a round is opened, the batches created at least
REPLAY_MIN_AGE_S ago are looked up by the key their header names: one whose SHA-256 over all
its bytes equals the digest stored with that key is that very envelope, verified when it
was stored, and is re-acked without verifying, decrypting or validating it again
(BatchWriter.find_replays says why that is safe); every other message takes the full
path. Sequence gaps per (agent, epoch) are tracked in the same transaction (migration 0040,
cloud_api.ingest.sequence). The worker coalesces the acks of the batches it handled together
into one signed ack per (agent, epoch) naming seq ranges.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, TypeVar, cast

import psycopg
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydantic import ValidationError

from cloud_api import metrics, tracing
from cloud_api.access.revocations import CredentialStamp
from cloud_api.db import TRANSIENT, with_retry
from cloud_api.ingest import derived
from cloud_api.ingest.sequence import note_gap, record_declared_losses
from common.mqtt import BrokerSettings, MqttLink
from oee.bounds import plain_errors
from oee.components import COMPONENT_FIELDS, INTEGER_FIELDS
from oee.events import AgentEvent, Event, OeeEvent, dump_events, load_events
from sync.envelope import (
    AFTER_SIGNATURE,
    AckBody,
    EnvelopeError,
    EnvelopeHeader,
    Framed,
    RejectionBody,
    clean_detail,
    envelope_digest,
    frame,
    open_framed,
    parse_header,
    sign_ack,
    sign_rejection,
)
from sync.keys import CloudKeyring, parse_ed25519_public
from sync.uplink import ack_topic, batch_topic

log = structlog.get_logger("cloud_api.ingest")

Status = Literal["stored", "duplicate", "rejected"]
T = TypeVar("T")
QUARANTINE_PAYLOAD_MAX = 64 * 1024  # of unverified or unanswered messages; answered: whole
ACK_MAX_BATCHES = 512  # keeps one ack far below the agents' 1 MiB ack limit
# Batches of one (agent, epoch) handled in the same round share one transaction up to this
# many events (a backlog drains in rounds of several batches of up to 1,000 events).
GROUP_MAX_EVENTS = 20_000
# Refusals of a verified batch that a resend can never change: answered with a rejection.
# Not `undecryptable` or `unknown_key`: a cloud key missing or mixed up on one ingest process
# is fixed by the operator, and the batch must still be there then.
PERMANENT: frozenset[str] = frozenset(
    {"invalid_schema", "invalid_content", "decompression", "conflict"}
)
# What PostgreSQL (or psycopg before sending) refuses in the data itself: out-of-range
# numbers, NUL and untranslatable characters, malformed values, a required value missing.
# Not the other integrity errors: a unique violation can come from two workers creating the
# same partition, a foreign key or partition-routing (check) violation from registry or
# retention changes made meanwhile; those stay unanswered and the agent sends again.
CONTENT_ERRORS = (psycopg.errors.DataError, psycopg.errors.NotNullViolation)
# A resend left the agent at least its ack timeout (15 s by default) after the batch was
# created: only batches older than this are looked up as possible replays before they are
# opened (a lookup for every fresh batch would cost more than the replays it finds; a replay
# that is not looked up still takes the full path, which re-acks it as before).
REPLAY_MIN_AGE_S = 5.0
REPLAY_DETAIL = "identical to a stored batch; re-acked"


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str | None = None
    header: EnvelopeHeader | None = None
    acked: bool = False  # stored (now or before): named in the round's signed ack
    ack_topic: str | None = None
    rejection: bytes | None = None  # the signed answer to a permanent refusal
    events: int = 0
    digest: str | None = None


@dataclass(frozen=True)
class Checked:
    """A batch that passed every check (signature, decryption, topic, site, schema), not yet
    stored."""

    topic: str
    payload: bytes
    header: EnvelopeHeader
    digest: str
    events: list[Event]


class Rejected(Exception):
    """A refused message; `verified`: the agent's signature vouches for `header`."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        header: EnvelopeHeader | None = None,
        *,
        verified: bool = False,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.header = header
        self.verified = verified and header is not None

    @property
    def permanent(self) -> bool:
        return self.verified and self.reason in PERMANENT


_ROLLUP_COLS = sql.SQL(", ").join(sql.Identifier(c) for c in COMPONENT_FIELDS)
_ROLLUP_SUMS = sql.SQL(", ").join(
    sql.SQL("sum({})").format(sql.Identifier(c)) for c in COMPONENT_FIELDS
)
_ROLLUP_ADD = sql.SQL(", ").join(
    sql.SQL("{c} = {t}.{c} + excluded.{c}").format(c=sql.Identifier(c), t=sql.Identifier("r"))
    for c in COMPONENT_FIELDS
)


def _rollup_sql(table: str, unit: str, source: str) -> sql.Composed:
    return sql.SQL(
        "INSERT INTO rollups.{table} AS r (site_id, equipment_id, bucket, {cols}) "
        "SELECT site_id, equipment_id, date_trunc({unit}, bucket_start), {sums} "
        "FROM {source} GROUP BY 1, 2, 3 "
        "ON CONFLICT (site_id, equipment_id, bucket) DO UPDATE SET {add}"
    ).format(
        table=sql.Identifier(table),
        cols=_ROLLUP_COLS,
        unit=sql.Literal(unit),
        sums=_ROLLUP_SUMS,
        source=sql.Identifier(source),
        add=_ROLLUP_ADD,
    )


# Facts and rollups in one statement from a staging table `_new_buckets` (bench.api loads
# its history this way; ingest uses STORE_BUCKETS_JSON below): the rollups add exactly the
# buckets this statement inserted (RETURNING), so a bucket that is already stored (sent again
# in another batch, or by a concurrent worker) is never added to a rollup twice.
STORE_BUCKETS = (
    sql.SQL(
        "WITH inserted AS (INSERT INTO facts.oee_buckets SELECT * FROM _new_buckets "
        "ON CONFLICT DO NOTHING RETURNING *), "
        "minute AS ({minute} RETURNING 1) {hour}"
    )
    .format(
        minute=_rollup_sql("oee_1m", "minute", "inserted"),
        hour=_rollup_sql("oee_1h", "hour", "inserted"),
    )
    .as_bytes()
)  # composed once: psycopg would compose it again at each execution
BUCKET_COLS = (
    "site_id", "equipment_id", "bucket_start", "bucket_end", "event_id", "shift",
    "shift_start", *COMPONENT_FIELDS, "downtime_by_reason",
)  # fmt: skip
# The columns of an OEE bucket from its JSON (PostgreSQL extracts them, instead of a Python
# loop building a column array each and psycopg dumping every value of them).
_BUCKET_VALUES = (
    "e->>'site_id'", "e->>'equipment_id'", "(e->>'bucket_start')::timestamptz",
    "(e->>'bucket_end')::timestamptz", "(e->>'event_id')::uuid", "e->>'shift'",
    "(e->>'shift_start')::timestamptz",
    *(
        f"(e->'components'->>'{f}')::{'bigint' if f in INTEGER_FIELDS else 'double precision'}"
        for f in COMPONENT_FIELDS
    ),
    "e->'downtime_by_reason'",
)  # fmt: skip
# The OEE buckets of a batch (or of a group of batches) from their JSON array (dumped by
# pydantic from the validated models, as the events are), in ONE statement: PostgreSQL
# extracts the columns; the buckets that are new go into facts and, exactly those
# (RETURNING), into the minute and hour rollups; every (site, equipment, UTC day) the batch
# touches gets a new data version (as derived.DATA_VERSIONS_SQL from a staging table).
STORE_BUCKETS_JSON = (
    sql.SQL(
        "WITH b AS (SELECT {values} FROM jsonb_array_elements(%s) AS t(e)), "
        "inserted AS (INSERT INTO facts.oee_buckets ({cols}) SELECT {cols} FROM b "
        "ON CONFLICT DO NOTHING RETURNING *), "
        "minute AS ({minute} RETURNING 1), hour AS ({hour} RETURNING 1) "
        "INSERT INTO rollups.data_versions AS v (site_id, equipment_id, day, version) "
        "SELECT site_id, equipment_id, (bucket_start AT TIME ZONE 'UTC')::date, "
        "nextval('rollups.data_version_seq') FROM b GROUP BY 1, 2, 3 "
        "ON CONFLICT (site_id, equipment_id, day) DO UPDATE SET version = excluded.version"
    )
    .format(
        values=sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(sql.SQL(v), sql.Identifier(c))
            for v, c in zip(_BUCKET_VALUES, BUCKET_COLS, strict=True)
        ),
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in BUCKET_COLS),
        minute=_rollup_sql("oee_1m", "minute", "inserted"),
        hour=_rollup_sql("oee_1h", "hour", "inserted"),
    )
    .as_bytes()
)
# The batch key and its events, then the agent's sequence row, equipment and last-seen
# (migration 0040); the parameters are cast so each call resolves to its function.
_BATCH_ARGS = (
    "%(site)s::text, %(agent)s::text, %(epoch)s::text, %(seq)s::bigint, %(digest)s::text, "
    "%(count)s::integer, %(created)s::timestamptz, %(trace)s::text, %(events)s::jsonb"
)
STORE_BATCH = (
    f"SELECT result, opened FROM ops.store_batch({_BATCH_ARGS}, %(equipment)s::text[])"
).encode()
# A batch without configuration reports or loss records, whole, in one call (migration
# 0041): as STORE_BATCH, then its OEE buckets (from the same JSON) and its status report.
INGEST_BATCH = (
    b"SELECT result, opened FROM ops.ingest_batch(%s::text, %s::text, %s::text, %s::bigint, "
    b"%s::text, %s::integer, %s::timestamptz, %s::text, %s::jsonb, %s::text[], %s::boolean, "
    b"%s::jsonb, %s::text, %s::timestamptz)"
)
CLAIM_BATCH = f"SELECT ops.claim_batch({_BATCH_ARGS})".encode()
FINISH_BATCH = (
    b"SELECT ops.finish_batch(%(site)s::text, %(agent)s::text, %(epoch)s::text, "
    b"%(seq)s::bigint, %(created)s::timestamptz, %(equipment)s::text[])"
)


def _equipment(events: Sequence[Event]) -> list[str]:
    """The equipment a batch names, sorted (a stable lock order); _check made sure every
    event is of the header's site."""
    return sorted({e.equipment_id for e in events if e.equipment_id})


def _raw_json(data: Any) -> str | bytes:
    # Jsonb's dumps hook: the batch is serialized already, send its bytes unchanged.
    if not isinstance(data, bytes):
        raise TypeError("expected the serialized batch")
    return data


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Inclusive ranges of consecutive seqs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


class AgentRegistry:
    """Enrolled agents and their public keys, cached; reloaded when an unknown key shows up."""

    def __init__(self, pool: ConnectionPool, refresh_s: float = 30.0) -> None:
        self.pool = pool
        self.refresh_s = refresh_s
        self._agents: dict[str, str] = {}
        self._keys: dict[tuple[str, str], Ed25519PublicKey] = {}
        self._loaded = 0.0
        self._lock = threading.Lock()
        self.stamp = CredentialStamp()

    def _load(self) -> None:
        with self.pool.connection() as conn:
            agents = conn.execute("SELECT agent_id, site_id FROM registry.agents").fetchall()
            keys = conn.execute(
                "SELECT agent_id, key_id, public_key FROM registry.agent_keys "
                "WHERE revoked_at IS NULL"
            ).fetchall()
        self._agents = {a: s for a, s in agents}
        parsed: dict[tuple[str, str], Ed25519PublicKey] = {}
        for agent_id, key_id, line in keys:
            with contextlib.suppress(Exception):
                parsed[(agent_id, key_id)] = parse_ed25519_public(line)
        self._keys = parsed
        self._loaded = time.monotonic()

    def site_of(self, agent_id: str) -> str | None:
        with self._lock:
            if agent_id not in self._agents or time.monotonic() - self._loaded > self.refresh_s:
                self._load()
            return self._agents.get(agent_id)

    def key(self, agent_id: str, key_id: str) -> Ed25519PublicKey | None:
        with self._lock:
            # A revoked key stops verifying within the stamp's refresh (cloud_api.revocations).
            if self.stamp.refresh(self.pool, self._load):
                return self._keys.get((agent_id, key_id))
            if (agent_id, key_id) not in self._keys:
                self._load()
            return self._keys.get((agent_id, key_id))


class BatchWriter:
    """The database half of ingest: verifies, opens and writes one sealed batch to PostgreSQL
    exactly once; usable without MQTT (tests, benchmarks). (The agent's outbox protocol is
    sync.uplink.BatchStore; this is its counterpart on the cloud side.)"""

    def __init__(
        self,
        pool: ConnectionPool,
        keyring: CloudKeyring,
        *,
        topic_prefix: str = "",
        max_envelope_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.pool = pool
        self.keyring = keyring
        self.topic_prefix = topic_prefix
        self.max_envelope_bytes = max_envelope_bytes
        self.registry = AgentRegistry(pool)
        self._partitions: set[str] = set()
        self._cursors: weakref.WeakKeyDictionary[psycopg.Connection[Any], psycopg.Cursor[Any]] = (
            weakref.WeakKeyDictionary()
        )

    # -- checks ---------------------------------------------------------------------------

    def _frame(self, payload: bytes) -> Framed:
        if len(payload) > self.max_envelope_bytes:
            raise Rejected("oversize", f"{len(payload)} bytes")
        try:
            return frame(payload)
        except EnvelopeError as exc:
            raise Rejected(exc.reason, exc.detail) from None

    def _check(
        self, topic: str, payload: bytes, framed: Framed | None = None
    ) -> tuple[EnvelopeHeader, bytes, str, list[Event]]:
        if framed is None:
            framed = self._frame(payload)
        header = framed.header
        if self.registry.site_of(header.agent_id) is None:
            raise Rejected("unknown_agent", header.agent_id, header)
        try:
            opened = open_framed(
                framed,
                verify_key_for=self.registry.key,
                decrypt_key_for=self.keyring.decrypt_key_for,
            )
        except EnvelopeError as exc:
            verified = exc.reason in AFTER_SIGNATURE
            raise Rejected(exc.reason, exc.detail, header, verified=verified) from None
        # From here on the header is the agent's own (its signature verified it).
        expected = batch_topic(self.topic_prefix, header.site_id, header.agent_id)
        if topic != expected:
            detail = f"{topic} carries a batch of {header.agent_id}"
            raise Rejected("wrong_topic", detail, header, verified=True)
        site = self.registry.site_of(header.agent_id)
        if site != header.site_id:
            raise Rejected("wrong_site", f"agent is enrolled at {site}", header, verified=True)
        try:
            events = load_events(opened.plaintext)
        except ValidationError as exc:
            # Locations and messages only: the refused input may hold anything (NUL, huge).
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            detail = plain_errors(errors[:3])
            raise Rejected("invalid_schema", detail, header, verified=True) from None
        if len(events) != header.count:
            detail = "event count differs from the header"
            raise Rejected("invalid_schema", detail, header, verified=True)
        for event in events:
            if event.agent_id != header.agent_id or event.site_id != header.site_id:
                detail = "an event names another agent or site"
                raise Rejected("invalid_schema", detail, header, verified=True)
        return header, payload, opened.digest, events

    # -- storing --------------------------------------------------------------------------

    def _ensure_partitions(self, conn: psycopg.Connection[Any], events: Sequence[Event]) -> None:
        # (year, month) tuples: strftime per event costs milliseconds per batch.
        stamps = {(e.ts.year, e.ts.month) for e in events}
        stamps |= {
            (e.bucket_start.year, e.bucket_start.month) for e in events if isinstance(e, OeeEvent)
        }
        months = {f"{y:04d}{m:02d}" for y, m in stamps}
        for month in sorted(months - self._partitions):
            t = datetime.strptime(month + "15", "%Y%m%d").replace(tzinfo=UTC)
            conn.execute("SELECT ops.ensure_month_partitions(%s)", (t,))
            self._partitions.add(month)

    def _store(
        self, header: EnvelopeHeader, digest: str, events: Sequence[Event]
    ) -> Literal["stored", "duplicate", "conflict"]:
        with self.pool.connection() as conn:
            self._ensure_partitions(conn, events)
            conn.commit()
            reports = [e for e in events if isinstance(e, AgentEvent)]
            if not derived.needs_statements(reports):
                return self._store_whole(conn, header, digest, events, reports)
            # Pipeline mode: what follows the batch key goes out without waiting; the
            # transaction waits for the server where the batch key's answer is read and at
            # its commit. An error anywhere still rolls back all of it.
            with conn.pipeline(), conn.transaction():
                # Batch key and events, then (only for a new key) the agent's sequence row,
                # equipment and last-seen (migration 0040): the events go in before the
                # agent's (agent, epoch) row is locked until commit, so workers insert the
                # events of one agent's batches in parallel while everything shared runs in
                # the same order as before.
                row = conn.execute(
                    STORE_BATCH, self._batch_params(header, digest, events, equipment=True)
                ).fetchone()
                assert row is not None
                result, opened = row
                if result != "stored":
                    return cast(Literal["duplicate", "conflict"], result)
                note_gap(header.agent_id, header.epoch, opened)
                self._store_buckets(conn, [e for e in events if isinstance(e, OeeEvent)])
                derived.record_reports(conn, events)
                record_declared_losses(conn, header.site_id, header.agent_id, list(events))
            return "stored"

    def _store_whole(
        self,
        conn: psycopg.Connection[Any],
        header: EnvelopeHeader,
        digest: str,
        events: Sequence[Event],
        reports: Sequence[AgentEvent],
    ) -> Literal["stored", "duplicate", "conflict"]:
        """A batch without configuration reports or loss records in ONE statement that is
        its own transaction (ops.ingest_batch, migration 0041): the connection in autocommit
        for that statement, whose result arrives only after its commit (an error rolls all
        of it back). No BEGIN, COMMIT or pipeline, and the buckets are taken from the
        events' JSON instead of being dumped a second time."""
        status = derived.status_report(reports)
        data, version, status_ts = status if status is not None else (None, None, None)
        params = (
            header.site_id,
            header.agent_id,
            header.epoch,
            header.seq,
            digest,
            header.count,
            header.created,
            header.trace_id,
            Jsonb(dump_events(events), dumps=_raw_json),
            _equipment(events),
            any(isinstance(e, OeeEvent) for e in events),
            data,
            version,
            status_ts,
        )
        # One cursor per connection, reused: its dumpers (a dozen parameter types) are made
        # once instead of at every batch.
        cur = self._cursors.get(conn)
        if cur is None or cur.closed:
            cur = self._cursors[conn] = conn.cursor()
        conn.autocommit = True
        try:
            row = cur.execute(INGEST_BATCH, params).fetchone()
        finally:
            if not conn.broken and not conn.closed:
                conn.autocommit = False
        assert row is not None
        result, opened = row
        if result == "stored":
            note_gap(header.agent_id, header.epoch, opened)
        return cast(Literal["stored", "duplicate", "conflict"], result)

    def _store_many(
        self, group: Sequence[Checked]
    ) -> list[Literal["stored", "duplicate", "conflict"]]:
        """The batches of one (agent, epoch) in one transaction, in seq order: per batch its
        key and events (as _store), then per stored batch its sequence row, equipment and
        last-seen, agent reports and loss records in the order _store would apply them one
        transaction after the other; the OEE buckets of all of them together."""
        ordered = sorted(group, key=lambda c: c.header.seq)
        with self.pool.connection() as conn:
            self._ensure_partitions(conn, [e for c in ordered for e in c.events])
            conn.commit()
            with conn.pipeline(), conn.transaction():
                claims = [
                    conn.execute(CLAIM_BATCH, self._batch_params(c.header, c.digest, c.events))
                    for c in ordered
                ]
                results: list[Literal["stored", "duplicate", "conflict"]] = []
                for cur in claims:
                    row = cur.fetchone()
                    assert row is not None
                    results.append(row[0])
                stored = [c for c, r in zip(ordered, results, strict=True) if r == "stored"]
                finished = []
                for c in stored:
                    h = c.header
                    finished.append(
                        conn.execute(
                            FINISH_BATCH,
                            {
                                "site": h.site_id,
                                "agent": h.agent_id,
                                "epoch": h.epoch,
                                "seq": h.seq,
                                "created": h.created,
                                "equipment": _equipment(c.events),
                            },
                        )
                    )
                    derived.record_reports(conn, c.events)
                    record_declared_losses(conn, h.site_id, h.agent_id, list(c.events))
                if stored:
                    events = [e for c in stored for e in c.events]
                    self._store_buckets(conn, [e for e in events if isinstance(e, OeeEvent)])
                for c, cur in zip(stored, finished, strict=True):
                    row = cur.fetchone()
                    note_gap(c.header.agent_id, c.header.epoch, row[0] if row else None)
        by_batch = {id(c): r for c, r in zip(ordered, results, strict=True)}
        return [by_batch[id(c)] for c in group]

    def _batch_params(
        self,
        header: EnvelopeHeader,
        digest: str,
        events: Sequence[Event],
        *,
        equipment: bool = False,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "site": header.site_id,
            "agent": header.agent_id,
            "epoch": header.epoch,
            "seq": header.seq,
            "digest": digest,
            "count": header.count,
            "created": header.created,
            "trace": header.trace_id,
            # Serialized once for the whole batch; _check made sure every event names the
            # header's agent and site.
            "events": Jsonb(dump_events(events), dumps=_raw_json),
        }
        if equipment:
            params["equipment"] = _equipment(events)
        return params

    def _store_buckets(self, conn: psycopg.Connection[Any], buckets: Sequence[OeeEvent]) -> None:
        """OEE buckets with their rollups and data versions, in one statement."""
        if buckets:
            data = dump_events(buckets)
            conn.execute(STORE_BUCKETS_JSON, (Jsonb(data, dumps=_raw_json),))

    def _quarantine(self, topic: str, payload: bytes | None, rejected: Rejected) -> None:
        """Count a refused message by reason and keep it (payload None: not worth keeping).

        A permanent refusal keeps the whole envelope: it is the only copy once the agent has
        dropped it, and it can be stored after a fix by publishing it again."""
        h = rejected.header
        kept = (
            payload if payload is None or rejected.permanent else payload[:QUARANTINE_PAYLOAD_MAX]
        )
        # Charged to an agent only when its signature vouches for the header naming it; an
        # unverified refusal goes under the topic it arrived on.
        agent, where = (h.agent_id, "") if h and rejected.verified else ("", topic[:500])

        def write() -> None:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute(
                    "INSERT INTO ops.quarantine(reason, detail, topic, site_id, agent_id, epoch, "
                    "seq, payload) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        rejected.reason,
                        clean_detail(rejected.detail[:2000]),
                        clean_detail(topic[:500]),
                        h.site_id if h else None,
                        h.agent_id if h else None,
                        h.epoch if h else None,
                        h.seq if h else None,
                        kept,
                    ),
                )
                conn.execute(
                    "INSERT INTO ops.reject_counts(reason, agent_id, topic, verified, count) "
                    "VALUES (%s, %s, %s, %s, 1) "
                    "ON CONFLICT (reason, agent_id, topic, verified) DO UPDATE "
                    "SET count = ops.reject_counts.count + 1, last_at = now()",
                    (rejected.reason, agent, clean_detail(where), rejected.verified),
                )

        with_retry(write)

    def make_ack(self, agent_id: str, epoch: str, digests: dict[int, str]) -> bytes:
        """One signed ack naming the stored batches of one (agent, epoch) as seq ranges."""
        key_id, key = self.keyring.current_ack
        body = AckBody(
            agent_id=agent_id,
            epoch=epoch,
            ranges=seq_ranges(digests),
            digests={str(seq): digest for seq, digest in sorted(digests.items())},
            key_id=key_id,
        )
        return sign_ack(body, key)

    def _reject(self, topic: str, payload: bytes, rejected: Rejected) -> Outcome:
        """Count and keep a refused message; answer a permanent refusal after that commit."""
        metrics.INGEST_REJECTS.labels(rejected.reason).inc()
        h = rejected.header
        log.warning(
            "batch rejected for good" if rejected.permanent else "batch rejected",
            reason=rejected.reason,
            detail=clean_detail(rejected.detail[:200]),
            topic=clean_detail(topic[:200]),
            verified=rejected.verified,
            trace_id=h.trace_id if h else None,
        )
        self._quarantine(topic, payload, rejected)
        if h is None or not rejected.permanent:
            return Outcome("rejected", rejected.reason, h)
        return Outcome(
            "rejected",
            rejected.reason,
            h,
            ack_topic=ack_topic(self.topic_prefix, h.site_id, h.agent_id),
            rejection=self.make_rejection(h, envelope_digest(payload), rejected),
        )

    def keep_failed(self, topic: str, payload: bytes, exc: Exception) -> Outcome:
        """Count and keep a batch that failed in an unexpected way; no answer: the failure is
        not known to be permanent, so the agent keeps the batch and sends it again."""
        failed = Rejected("internal_error", f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(EnvelopeError):
            failed.header = parse_header(payload)
        metrics.INGEST_REJECTS.labels(failed.reason).inc()
        try:
            self._quarantine(topic, payload, failed)
        except Exception:  # the database is gone too: the caller's log line is what is left
            log.exception("could not keep the failed batch in quarantine")
        return Outcome("rejected", failed.reason, failed.header)

    def make_rejection(self, header: EnvelopeHeader, digest: str, rejected: Rejected) -> bytes:
        """The signed answer naming one refused envelope, by the key that signs acks."""
        key_id, key = self.keyring.current_ack
        body = RejectionBody(
            agent_id=header.agent_id,
            epoch=header.epoch,
            seq=header.seq,
            digest=digest,
            reason=rejected.reason,
            detail=clean_detail(rejected.detail),
            key_id=key_id,
        )
        return sign_rejection(body, key)

    def find_replays(
        self, messages: Sequence[tuple[str, bytes]]
    ) -> tuple[dict[int, Outcome], dict[int, Framed]]:
        """The messages of a round that are, byte for byte, an envelope stored before: their
        re-acks, found without verifying, decrypting or validating them again; and the
        framed envelope of the others that were looked at (for check()).

        Safe to decide before the signature is verified: a message is a replay only when the
        SHA-256 of all its bytes equals the digest stored with the batch of the key its
        header names, so it IS that envelope, whose signature, content and topic were
        verified when it was stored; and its agent must still be enrolled at that site with
        the signing key not revoked, as the full path would require. A forged or altered
        header or payload has another digest and takes the full path, which verifies it
        first: nothing unauthenticated is acked, stored or charged to an agent here, and
        only a stored batch is acked. What an attacker gains by sending a captured envelope
        again is the re-ack the full path would send too, for one indexed lookup per round.
        Only batches created at least REPLAY_MIN_AGE_S ago are looked up. Database errors
        propagate; the caller then takes the full path for every message."""
        framed: dict[int, Framed] = {}
        wanted: dict[int, tuple[Framed, str]] = {}
        now = datetime.now(UTC)
        for i, (topic, payload) in enumerate(messages):
            try:
                f = self._frame(payload)
            except Rejected:
                continue  # refused on the full path, with its reason
            framed[i] = f
            h = f.header
            if topic != batch_topic(self.topic_prefix, h.site_id, h.agent_id):
                continue
            with contextlib.suppress(ValueError):
                age = (now - datetime.fromisoformat(h.created)).total_seconds()
                if age < REPLAY_MIN_AGE_S:
                    continue
            # What the full path requires of the agent besides the envelope: still enrolled
            # at that site, the signing key not revoked (looked up before a connection is
            # held: a registry reload takes one of its own).
            if self.registry.site_of(h.agent_id) != h.site_id:
                continue
            if self.registry.key(h.agent_id, h.signing_key_id) is None:
                continue
            wanted[i] = (f, envelope_digest(payload))
        if not wanted:
            return {}, framed
        keys = [
            (f.header.site_id, f.header.agent_id, f.header.epoch, f.header.seq)
            for f, _ in wanted.values()
        ]
        replays: dict[int, Framed] = {}
        # The lookup and the replays' trace in one transaction.
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT b.site_id, b.agent_id, b.epoch, b.seq, b.digest FROM facts.batches b "
                "WHERE (b.site_id, b.agent_id, b.epoch, b.seq) IN (SELECT * FROM "
                "unnest(%s::text[], %s::text[], %s::text[], %s::bigint[]))",
                [list(col) for col in zip(*keys, strict=True)],
            ).fetchall()
            stored = {(r[0], r[1], r[2], int(r[3])): r[4] for r in rows}
            for i, (f, digest) in wanted.items():
                h = f.header
                # New, or another envelope under that key: the full path decides.
                if stored.get((h.site_id, h.agent_id, h.epoch, h.seq)) == digest:
                    replays[i] = f
            if not replays:
                conn.rollback()
                return {}, framed
            self._keep_replays(conn, [(messages[i][0], f.header) for i, f in replays.items()])
            conn.commit()
        outcomes: dict[int, Outcome] = {}
        for i, f in replays.items():
            h = f.header
            metrics.INGEST_BATCHES.labels("duplicate").inc()
            metrics.INGEST_REJECTS.labels("replay").inc()
            outcomes[i] = Outcome(
                "duplicate",
                None,
                h,
                acked=True,
                ack_topic=ack_topic(self.topic_prefix, h.site_id, h.agent_id),
                digest=wanted[i][1],
            )
        return outcomes, framed

    def _keep_replays(
        self, conn: psycopg.Connection[Any], replays: Sequence[tuple[str, EnvelopeHeader]]
    ) -> None:
        """The trace of replays (as _quarantine keeps for one, without the payload), all of
        a round in the caller's transaction."""
        per_agent: dict[str, int] = {}
        for _, h in replays:
            per_agent[h.agent_id] = per_agent.get(h.agent_id, 0) + 1
        with conn.pipeline():
            conn.cursor().executemany(
                "INSERT INTO ops.quarantine(reason, detail, topic, site_id, agent_id, "
                "epoch, seq, payload) VALUES ('replay', %s, %s, %s, %s, %s, %s, NULL)",
                [
                    (REPLAY_DETAIL, clean_detail(topic[:500]), h.site_id, h.agent_id,
                     h.epoch, h.seq)
                    for topic, h in replays
                ],
            )  # fmt: skip
            conn.cursor().executemany(
                "INSERT INTO ops.reject_counts(reason, agent_id, topic, verified, count) "
                "VALUES ('replay', %s, '', true, %s) "
                "ON CONFLICT (reason, agent_id, topic, verified) DO UPDATE "
                "SET count = ops.reject_counts.count + excluded.count, last_at = now()",
                sorted(per_agent.items()),
            )

    def check(self, topic: str, payload: bytes, framed: Framed | None = None) -> Checked | Outcome:
        """Check one MQTT message: a Checked batch to store, or the Outcome of its refusal
        (counted and kept in quarantine). Never raises for bad input. `framed`: the message
        framed already (find_replays)."""
        try:
            header, _, digest, events = self._check(topic, payload, framed)
        except Rejected as rejected:
            return self._reject(topic, payload, rejected)
        return Checked(topic, payload, header, digest, events)

    def process(self, topic: str, payload: bytes) -> Outcome:
        """Handle one MQTT message; never raises for bad input (database outages do raise)."""
        checked = self.check(topic, payload)
        return checked if isinstance(checked, Outcome) else self.store_checked(checked)

    def store_checked(self, c: Checked) -> Outcome:
        """Store one checked batch in its own transaction and say what became of it."""
        header = c.header
        # The agent's trace id joins the span, the stored batch and events, and the log lines.
        with tracing.batch_span(
            header.trace_id, {"agent": header.agent_id, "site": header.site_id, "seq": header.seq}
        ):
            try:
                result = with_retry(lambda: self._store(header, c.digest, c.events))
            except CONTENT_ERRORS as exc:
                # The transaction rolled back whole; this content fails the same way each time.
                detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                content = Rejected("invalid_content", detail, header, verified=True)
                return self._reject(c.topic, c.payload, content)
        return self._outcome(c, result)

    def store_group(self, group: Sequence[Checked]) -> list[Outcome]:
        """Store checked batches of one (agent, epoch) in ONE transaction: one commit and one
        wait for the agent's sequence row for all of them instead of one each (the batches of
        one agent are serialized on that row from its lock to the commit). Each batch is
        stored exactly as alone (see _store_many); when the transaction fails on content,
        each batch is stored again in a transaction of its own, so one bad batch is refused
        alone and the others are stored. Database outages raise, with nothing stored."""
        if len(group) == 1:
            return [self.store_checked(group[0])]
        first = group[0].header
        if any((c.header.agent_id, c.header.epoch) != (first.agent_id, first.epoch) for c in group):
            raise ValueError("a group holds the batches of one (agent, epoch)")
        with tracing.batch_span(
            first.trace_id,
            {
                "agent": first.agent_id,
                "site": first.site_id,
                "seq": first.seq,
                "batches": len(group),
            },
        ):
            try:
                results = with_retry(lambda: self._store_many(group))
            except CONTENT_ERRORS:
                return [self.store_checked(c) for c in group]
        return [self._outcome(c, r) for c, r in zip(group, results, strict=True)]

    def _outcome(self, c: Checked, result: Literal["stored", "duplicate", "conflict"]) -> Outcome:
        """What a committed (or found) batch is answered with; after its transaction."""
        header, digest, events = c.header, c.digest, c.events
        if result == "conflict":
            conflict = Rejected(
                "conflict", "same (agent, epoch, seq), different content", header, verified=True
            )
            log.error(
                "batch key reused with different content",
                trace_id=header.trace_id,
                agent=header.agent_id,
                epoch=header.epoch,
                seq=header.seq,
            )
            return self._reject(c.topic, c.payload, conflict)
        metrics.INGEST_BATCHES.labels(result).inc()
        if result == "duplicate":
            # Stored before: re-ack (the first ack may have been lost), count it, keep a trace
            # without the payload (the identical bytes are stored already).
            metrics.INGEST_REJECTS.labels("replay").inc()
            replay = Rejected("replay", REPLAY_DETAIL, header, verified=True)
            self._quarantine(c.topic, None, replay)
        if result == "stored":
            metrics.INGEST_EVENTS.inc(len(events))
            with contextlib.suppress(ValueError):
                lag = (datetime.now(UTC) - datetime.fromisoformat(header.created)).total_seconds()
                metrics.INGEST_LAG.observe(max(0.0, lag))
        return Outcome(
            result,
            None,
            header,
            acked=True,
            ack_topic=ack_topic(self.topic_prefix, header.site_id, header.agent_id),
            events=len(events) if result == "stored" else 0,
            digest=digest,
        )


class IngestWorker:
    """Subscribes (shared subscription), processes on worker threads, publishes acks."""

    def __init__(
        self,
        store: BatchWriter,
        broker: BrokerSettings,
        *,
        share_group: str = "ingest",
        workers: int = 1,
        client_id: str | None = None,
        queue_size: int = 10_000,
        ack_coalesce: int = 64,
    ) -> None:
        self.store = store
        self.broker = broker
        self.share_group = share_group
        self.workers = workers
        # Bounded: when full, paho's thread waits, so the broker holds (or, beyond its own
        # limits, drops) further messages; the agents' resend recovers dropped ones.
        self.queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=queue_size)
        self.ack_coalesce = max(1, ack_coalesce)
        self.stop_event = threading.Event()
        self.processed = 0  # messages handled by this worker's threads (any outcome)
        self.subscribed = threading.Event()
        import secrets

        self.link = MqttLink(
            broker,
            client_id or f"ingest-{secrets.token_hex(4)}",
            [self.subscription],
            on_message=self._on_message,
            on_connection=self._on_connection,
            on_subscribed=self._on_subscribed,
            log=log,
        )
        self._threads: list[threading.Thread] = []

    @property
    def subscription(self) -> str:
        return f"$share/{self.share_group}/{self.store.topic_prefix}edge/+/+/v1/batches"

    def _on_connection(self, up: bool) -> None:
        if up:
            log.info("broker connected", subscription=self.subscription)

    def _on_subscribed(self) -> None:
        # Batches published before this SUBACK went to no subscriber and wait for the
        # agents' resend; whoever starts ingest and agents together waits for this line.
        log.info("subscribed", subscription=self.subscription)
        self.subscribed.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        item = (topic, payload)
        # Waiting here is the back-pressure on the broker; a stop must still end the wait
        # (the message is not acked at the broker, so it is redelivered or resent).
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _guard(self, step: Callable[[], T], topic: str, payload: bytes) -> T | Outcome | None:
        """One step of one message, waiting out database outages; None when stopping first.
        An unexpected error keeps the message in quarantine, unanswered (the agent resends)."""
        while not self.stop_event.is_set():
            try:
                return step()
            except TRANSIENT as exc:
                log.warning("database unavailable, holding the batch", error=str(exc)[:200])
                self.stop_event.wait(2.0)
            except Exception as exc:  # a bug must not kill the worker; the agent will resend
                log.exception("unexpected error while processing a batch")
                return self.store.keep_failed(topic, payload, exc)
        return None

    def _store_group(self, group: list[Checked]) -> list[Outcome] | None:
        """Checked batches of one (agent, epoch) stored together, waiting out database
        outages; None when stopping first. After an unexpected error each batch is tried
        alone, so the error is kept with the batch it belongs to."""
        while not self.stop_event.is_set():
            try:
                return self.store.store_group(group)
            except TRANSIENT as exc:
                log.warning("database unavailable, holding the batches", error=str(exc)[:200])
                self.stop_event.wait(2.0)
            except Exception:
                log.exception("unexpected error while storing batches together; one by one")
                outcomes: list[Outcome] = []
                for c in group:
                    outcome = self._guard(partial(self.store.store_checked, c), c.topic, c.payload)
                    if outcome is None:
                        return None
                    outcomes.append(outcome)
                return outcomes
        return None

    def _find_replays(
        self, items: list[tuple[str, bytes]]
    ) -> tuple[dict[int, Outcome], dict[int, Framed]]:
        """BatchWriter.find_replays; on any error none (the full path handles every message,
        waiting out a database outage)."""
        try:
            return self.store.find_replays(items)
        except Exception as exc:
            log.warning("replay check failed; full path for the round", error=str(exc)[:200])
            return {}, {}

    def _handle(self, items: list[tuple[str, bytes]]) -> tuple[list[Outcome], bool]:
        """Check every message of a round, then store the checked batches of each (agent,
        epoch) together; the outcomes so far and whether the worker is stopping."""
        outcomes: list[Outcome] = []
        checked: list[Checked] = []
        replays, framed = self._find_replays(items)
        for i, (topic, payload) in enumerate(items):
            if i in replays:
                outcomes.append(replays[i])
                self.processed += 1
                continue
            check = partial(self.store.check, topic, payload, framed.get(i))
            result = self._guard(check, topic, payload)
            if result is None:
                return outcomes, True
            if isinstance(result, Outcome):
                outcomes.append(result)
                self.processed += 1
            else:
                checked.append(result)
        groups: dict[tuple[str, str], list[list[Checked]]] = {}
        for c in checked:
            parts = groups.setdefault((c.header.agent_id, c.header.epoch), [[]])
            if sum(len(x.events) for x in parts[-1]) + len(c.events) > GROUP_MAX_EVENTS:
                parts.append([])
            parts[-1].append(c)
        for parts in groups.values():
            for group in parts:
                if not group:
                    continue
                stored = self._store_group(group)
                if stored is None:
                    return outcomes, True
                outcomes.extend(stored)
                self.processed += len(stored)
        return outcomes, False

    def _publish_acks(self, outcomes: list[Outcome]) -> None:
        """One signed ack per (agent, epoch) naming every batch stored in this round."""
        groups: dict[tuple[str, str, str], dict[int, str]] = {}
        for o in outcomes:
            if o.rejection is not None and o.ack_topic is not None:
                self.link.publish(o.ack_topic, o.rejection, qos=1)
                continue
            if not o.acked or o.ack_topic is None or o.header is None or o.digest is None:
                continue
            key = (o.ack_topic, o.header.agent_id, o.header.epoch)
            groups.setdefault(key, {})[o.header.seq] = o.digest
        for (topic, agent_id, epoch), digests in groups.items():
            for i in range(0, len(digests), ACK_MAX_BATCHES):
                part = dict(sorted(digests.items())[i : i + ACK_MAX_BATCHES])
                self.link.publish(topic, self.store.make_ack(agent_id, epoch, part), qos=1)

    def _work(self) -> None:
        while not self.stop_event.is_set():
            items = [self.queue.get()]
            # What is already queued is handled in the same round, so its acks go out
            # together (fewer signatures and messages under load, no added wait when idle);
            # a round takes its share of the queue only, so the other threads work on the
            # rest meanwhile and no ack waits behind a long round of one thread.
            take = min(self.ack_coalesce, 1 + self.queue.qsize() // self.workers)
            while len(items) < take and items[-1] is not None:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            messages: list[tuple[str, bytes]] = []
            for item in items:
                if item is None:
                    break
                messages.append(item)
            outcomes, stopping = self._handle(messages)
            stopping = stopping or len(messages) < len(items)
            self._publish_acks(outcomes)
            if stopping:
                break

    def start(self) -> None:
        self.link.start()
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"ingest-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self.stop_event.set()
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)
        for t in self._threads:
            t.join(timeout=10)
        self.link.stop()
