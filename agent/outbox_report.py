"""What `edge-agent buffer stats` and `keys status` report about the outbox, from either side.

The running agent holds its outbox open in SQLite's exclusive locking mode (its WAL index in
memory instead of a shared `-shm` file, fewer pages written at every commit: README
"Storage"), so no other process can open the file while it runs. The commands then ask the
agent over its health port (`GET /outbox`, `GET /outbox/keys`), which answers with the same
dictionaries these functions build; with no agent running they open the file themselves.
"""

from __future__ import annotations

import json
from typing import Any

from agent.config import AgentConfig
from buffer.outbox import Outbox


class AgentNotAnswering(Exception):
    """The agent holds the state folder but its health port gives no answer."""


def stats_report(outbox: Outbox, config: AgentConfig) -> dict[str, Any]:
    """The outbox's figures as `buffer stats --json` prints them."""
    from agent.outbox_writer import fill_level

    stats = outbox.stats()
    return {
        "epoch": stats.epoch,
        "depth_batches": stats.depth,
        "events": stats.events,
        "bytes": stats.bytes,
        "quota_bytes": stats.max_bytes,
        "capacity_bytes": stats.capacity_bytes,
        "disk_free_bytes": stats.disk_free_bytes,
        "min_free_bytes": stats.min_free_bytes,
        "fill": round(stats.fill_ratio, 4),
        "fill_level": fill_level(stats.fill_ratio, full=False),
        "when_full": config.outbox.when_full,
        "oldest_unacked_age_s": stats.oldest_unacked_age_s,
        "oldest_unacked_seq": stats.oldest_unacked_seq,
        "acked_seq_high_water": stats.acked_seq_high_water,
        "acked_batches_total": stats.acked_batches_total,
        "next_seq": stats.next_seq,
        "sheddable_batches": stats.sheddable_batches,
        "shed_batches_total": stats.shed_batches_total,
        "shed_events_total": stats.shed_events_total,
    }


def keys_report(outbox: Outbox) -> dict[str, dict[str, int]]:
    """Batches not acked yet, counted by the key that signed them and the cloud key sealing
    them (what `keys status` needs before a retired key may be revoked)."""
    from sync.envelope import EnvelopeError, parse_header

    by_signer: dict[str, int] = {}
    by_cloud: dict[str, int] = {}
    after = 0
    while batches := outbox.pending(1000, after_seq=after):
        for batch in batches:
            try:
                header = parse_header(batch.envelope)
            except EnvelopeError:
                continue
            by_signer[header.signing_key_id] = by_signer.get(header.signing_key_id, 0) + 1
            by_cloud[header.cloud_key_id] = by_cloud.get(header.cloud_key_id, 0) + 1
        after = batches[-1].seq
    return {
        "unacked_batches_by_signing_key": by_signer,
        "unacked_batches_by_cloud_key": by_cloud,
    }


def ask_agent(config: AgentConfig, path: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET `path` of the running agent's health port as JSON; AgentNotAnswering otherwise."""
    import httpx

    if not config.health.enabled:
        raise AgentNotAnswering(
            "health.enabled is false, so the running agent cannot be asked for its outbox"
        )
    url = f"http://127.0.0.1:{config.health.port}{path}"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
        data = json.loads(response.text)
    except (httpx.HTTPError, ValueError) as exc:
        raise AgentNotAnswering(f"no answer from the running agent on {url}: {exc}") from None
    if not isinstance(data, dict):
        raise AgentNotAnswering(f"{url} answered {type(data).__name__}, not an object")
    return data
