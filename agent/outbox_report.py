"""What `edge-agent buffer stats` and `keys status` report about the outbox, from either side.

The running agent holds its outbox open in SQLite's exclusive locking mode (its WAL index in
memory instead of a shared `-shm` file, fewer pages written at every commit: README
"Storage"), so no other process can open the file while it runs. The commands then ask the
agent over its health port (`GET /outbox`, `GET /outbox/keys`), which answers with the same
dictionaries these functions build; with no agent running they open the file themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from agent.config import AgentConfig
from buffer.outbox import Outbox, PendingBatch


class AgentNotAnswering(Exception):
    """The agent holds the state folder but its health port gives no answer."""


def stats_report(outbox: Outbox, config: AgentConfig) -> dict[str, Any]:
    """The outbox's figures as `buffer stats --json` prints them."""
    from agent.outbox_writer import fill_level

    stats = outbox.stats()
    return {
        "outbox": outbox_name(config),
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


def outbox_name(config: AgentConfig) -> str:
    """The outbox file as the reports name it: its absolute path, so that a command can tell
    whether the agent answering on `health.port` is the one whose configuration it was given
    (two agents on one box with the same port: the second one's endpoint does not start)."""
    return str(config.outbox_path.resolve())


def keys_report(outbox: Outbox) -> dict[str, dict[str, int]]:
    """Batches not acked yet, counted by the key that signed them and the cloud key sealing
    them (what `keys status` needs before a retired key may be revoked)."""
    counts: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for batches in _pages(outbox):
        _count_keys(batches, counts)
    return _keys_dict(counts)


async def keys_report_async(outbox: Outbox) -> dict[str, dict[str, int]]:
    """`keys_report` inside the running agent: a page of batches at a time with the event
    loop let go between pages, so a large backlog never holds up polling or the watchdog."""
    import asyncio

    counts: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for batches in _pages(outbox):
        _count_keys(batches, counts)
        await asyncio.sleep(0)
    return _keys_dict(counts)


KEYS_PAGE = 500


def _pages(outbox: Outbox) -> Iterator[list[PendingBatch]]:
    """The unacked batches, KEYS_PAGE at a time, oldest first."""
    after = 0
    while batches := outbox.pending(KEYS_PAGE, after_seq=after):
        yield batches
        after = batches[-1].seq


def _count_keys(batches: list[PendingBatch], counts: tuple[dict[str, int], dict[str, int]]) -> None:
    from sync.envelope import EnvelopeError, parse_header

    by_signer, by_cloud = counts
    for batch in batches:
        try:
            header = parse_header(batch.envelope)
        except EnvelopeError:
            continue
        by_signer[header.signing_key_id] = by_signer.get(header.signing_key_id, 0) + 1
        by_cloud[header.cloud_key_id] = by_cloud.get(header.cloud_key_id, 0) + 1


def _keys_dict(counts: tuple[dict[str, int], dict[str, int]]) -> dict[str, dict[str, int]]:
    return {
        "unacked_batches_by_signing_key": counts[0],
        "unacked_batches_by_cloud_key": counts[1],
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
    mine = outbox_name(config)
    if data.get("outbox") != mine:
        raise AgentNotAnswering(
            f"the agent answering on {url} keeps its outbox in {data.get('outbox')}, not in "
            f"{mine}: two agents on this box use health.port {config.health.port}; give each "
            "its own"
        )
    return data
