"""Sequence-gap tracking per (agent, epoch), inside the ingest transaction.

A batch whose seq jumps past the highest seen opens a gap (ops.seq_gaps); a batch arriving
later inside a gap fills that seq (the gap row is resolved and what remains reopened, so the
detection time survives); a loss record declares the seqs it names (ops.declared_losses):
`data_shed` (raw samples shed under the drop policy, reason = their kind) and
`batch_rejected` (a batch ingest refused for good and the agent dropped, reason =
"rejected: <ingest's reason>"). A loss recorded twice (the agent crashed between recording
it and dropping the batch) is declared once. With several workers and an in-flight window,
short-lived gaps are normal; a gap that stays open beyond the agents' resend period means
batches are missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import psycopg
import structlog
from prometheus_client import Counter

from oee.events import AgentEvent, Event

log = structlog.get_logger("cloud_api.sequence")
GAPS_OPENED = Counter("ingest_seq_gaps_opened_total", "Sequence gaps opened (may fill later)")
LOSSES_DECLARED = Counter("ingest_declared_lost_batches_total", "Batches declared shed by agents")

LOSS_CODE = "data_shed"
REJECTED_CODE = "batch_rejected"


def note_gap(agent_id: str, epoch: str, opened: Sequence[int] | None) -> None:
    """Count and log the gap a stored batch opened (ops.finish_batch, migration 0040, tracks
    the (agent, epoch) high-water mark and the gaps in the storing transaction)."""
    if opened:
        GAPS_OPENED.inc()
        log.debug(
            "sequence gap opened", agent=agent_id, epoch=epoch, first=opened[0], last=opened[1]
        )


def _resolve(
    conn: psycopg.Connection[Any],
    site_id: str,
    agent_id: str,
    epoch: str,
    seq: int,
    resolution: Literal["filled", "declared"],
) -> bool:
    row = conn.execute(
        "SELECT ops.resolve_seq_gap(%s::text, %s::text, %s::text, %s::bigint, %s::text)",
        (site_id, agent_id, epoch, seq, resolution),
    ).fetchone()
    return bool(row and row[0])


def record_declared_losses(
    conn: psycopg.Connection[Any], site_id: str, agent_id: str, events: list[Event]
) -> int:
    """Apply the loss records of a batch: the seqs they name are declared, not missing."""
    declared = 0
    for event in events:
        if not isinstance(event, AgentEvent) or event.code not in (LOSS_CODE, REJECTED_CODE):
            continue
        epoch, seqs = event.data.get("epoch"), event.data.get("seqs")
        if not isinstance(epoch, str) or not isinstance(seqs, list):
            continue
        if event.code == REJECTED_CODE:
            reason = f"rejected: {event.data.get('reason')}"
        else:
            reason = str(event.data.get("kind", "sample"))
        for seq in seqs:
            if type(seq) is not int or seq < 1:
                continue
            stored = conn.execute(
                "SELECT 1 FROM facts.batches WHERE site_id = %s AND agent_id = %s "
                "AND epoch = %s AND seq = %s",
                (site_id, agent_id, epoch, seq),
            ).fetchone()
            if stored is not None:
                continue  # it made it before it was shed: nothing was lost
            conn.execute(
                "INSERT INTO ops.declared_losses(agent_id, epoch, seq, site_id, reason) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (agent_id, epoch, seq, site_id, reason[:200]),
            )
            _resolve(conn, site_id, agent_id, epoch, seq, "declared")
            declared += 1
    if declared:
        LOSSES_DECLARED.inc(declared)
        log.warning("agent declared shed batches", agent=agent_id, batches=declared)
    return declared
