"""The engine state on disk: what each flush writes of it, and what a restart begins from.

At each flush every equipment's checkpoint is compared with what is stored for it
(oee.checkpoint.plan): unchanged but for the clock, it costs nothing; a part counted writes a
small patch; any other change writes the keys of the equipment's (compact) checkpoint that
changed (the whole of it when none is stored yet). The entries
of one flush form one journal row (JSON, zlib-compressed), committed in the transaction that
stores the flush's batches, so the events and the state that produced them stay together.
Every journal row also records the instant up to which the agent had accounted time.

A `keys` entry is written compactly: a changed map of integer totals (an equipment's shift
totals) as what was added to the stored one, and equipment whose entries are then the same
(idle presses whose buckets close together) share one entry with the list of their ids. An
idle line's bucket close is then one small row (about 400 bytes for 100 presses instead of
1.7 KB), which fits in a page of its own table with no overflow page: fewer pages per commit.

When nothing changed, a bare row (a heartbeat) is committed every `heartbeat_s` seconds
(earlier when a flush commits events anyway). Every `snapshot_s` seconds the journal is
folded into a snapshot: one row holding every equipment's state, compressed together (about
70 bytes an equipment; 100 rows of their own would take about 50 KB of pages). The fold
waits for a flush that commits anyway (at most another `snapshot_s`), so an idle line does
not pay a commit of its own for it.

Crash bound: a restart resumes every equipment from its stored state, accounts time with
that state up to the last committed row's instant (exactly what the agent accounted before
the crash, since any change of state was committed when it happened) and marks it unknown
("agent restarted") from there. So at most `heartbeat_s` plus one flush interval of observed
time before a crash or power loss is reported as unknown instead of as the machine's state;
while anything on the line changes, a row is committed at every flush and the bound is one
flush interval. Counts stay exact: PLC counters are cumulative, and a part is stored
together with the counter value that counted it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from buffer.outbox import Outbox, StateWrite
from oee.checkpoint import WriteKind, apply, plan
from oee.engine import PlantEngine, from_us, to_us
from oee.events import Event

US = 1_000_000
SNAPSHOT_KEY = "plant"
# The journal row's sections: whole checkpoints, changed top-level keys, counter patches.
_TAGS: dict[WriteKind, str] = {"full": "f", "keys": "k", "counts": "c"}


def _totals(value: Any) -> dict[str, int] | None:
    """`value` as a map of integer totals, or None when it is not one."""
    if not isinstance(value, dict):
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        return value
    return None


def _resolve(stored: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A compact `keys` patch (see `_compact`) as the plain one, against the stored state."""
    added = patch.get("add")
    if not added:
        return patch
    plain = {k: v for k, v in patch.items() if k != "add"}
    changed = dict(plain.get("set", {}))
    for key, delta in added.items():
        old = _totals(stored.get(key)) or {}
        total = {k: old.get(k, 0) + delta.get(k, 0) for k in (*old, *delta)}
        changed[key] = {k: v for k, v in total.items() if v != 0}
    plain["set"] = changed
    return plain


def _compact(stored: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A `keys` patch with changed integer totals written as what was added to them; the
    plain patch when that would not give back exactly the same."""
    changed = patch.get("set", {})
    added: dict[str, dict[str, int]] = {}
    for key, value in changed.items():
        new, old = _totals(value), _totals(stored.get(key))
        if new is None or old is None or any(v == 0 for v in new.values()):
            continue
        added[key] = {k: new.get(k, 0) - old.get(k, 0) for k in (*old, *new)}
        added[key] = {k: v for k, v in added[key].items() if v != 0}
    if not added:
        return patch
    compact = {**patch, "set": {k: v for k, v in changed.items() if k not in added}}
    compact["add"] = added
    return compact if _resolve(stored, compact) == patch else patch


def _group(patches: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The `keys` section of a journal row: entries shared by several equipment once."""
    shared: dict[str, list[str]] = {}
    for eq, patch in patches.items():
        shared.setdefault(json.dumps(patch, sort_keys=True, separators=(",", ":")), []).append(eq)
    body: dict[str, Any] = {}
    single = {eqs[0]: patches[eqs[0]] for eqs in shared.values() if len(eqs) == 1}
    if single:
        body["k"] = single
    groups = [[patches[eqs[0]], eqs] for eqs in shared.values() if len(eqs) > 1]
    if groups:
        body["K"] = groups
    return body


def key_entries(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `keys` entries of a decoded journal row by equipment (compact, see `_resolve`)."""
    out: dict[str, dict[str, Any]] = dict(body.get("k", {}))
    for patch, eqs in body.get("K", []):
        for eq in eqs:
            out[str(eq)] = patch
    return out


def encode(value: Any) -> bytes:
    return zlib.compress(json.dumps(value, separators=(",", ":")).encode(), 6)


def decode(data: bytes) -> Any:
    return json.loads(zlib.decompress(data))


@dataclass
class _Prepared:
    write: StateWrite
    stored: dict[str, dict[str, Any]]


class EngineStore:
    """Turns the engine's checkpoints into outbox state writes; `prepare()` before a commit,
    `committed()` once it is on disk (a held flush leaves the stored view as it was)."""

    def __init__(self, outbox: Outbox, *, heartbeat_s: float, snapshot_s: float) -> None:
        self.outbox = outbox
        self.heartbeat_us = round(heartbeat_s * US)
        self.snapshot_us = round(snapshot_s * US)
        self._stored: dict[str, dict[str, Any]] = {}
        self._on_disk: set[str] = set()  # keys of the snapshot rows
        self._last_at: int | None = None
        self._snapshot_at: int | None = None
        self._fold = False
        self._prepared: _Prepared | None = None

    def load(self) -> tuple[dict[str, dict[str, Any]], int | None]:
        """The stored checkpoints by equipment and the instant time was accounted up to."""
        found = self.outbox.load_state()
        stored: dict[str, dict[str, Any]] = {}
        for data in found.rows.values():
            try:
                value = decode(data)
            except (zlib.error, ValueError):
                continue  # its equipment start afresh
            if isinstance(value, dict):
                stored.update({k: v for k, v in value.items() if isinstance(v, dict)})
        self._on_disk = set(found.rows)
        if not found.rows and found.legacy is not None:
            try:
                legacy = json.loads(found.legacy)
            except ValueError:
                legacy = {}
            if isinstance(legacy, dict):
                stored = {k: v for k, v in legacy.items() if isinstance(v, dict)}
        at: int | None = None
        for row_at, entry in found.journal:
            at = row_at
            if entry is None:
                continue
            try:
                body = decode(entry)
            except (zlib.error, ValueError):
                continue
            for eq, checkpoint in body.get("f", {}).items():
                stored[eq] = checkpoint
            for eq, patch in key_entries(body).items():
                if eq in stored:
                    stored[eq] = apply(stored[eq], "keys", _resolve(stored[eq], patch))
            for eq, patch in body.get(_TAGS["counts"], {}).items():
                if eq in stored:
                    stored[eq] = apply(stored[eq], "counts", patch)
        self._stored = stored
        self._last_at = at
        # What was there is folded at the first flush (that flush changes every equipment to
        # unknown anyway).
        self._fold = bool(found.journal) or found.legacy is not None
        return {k: dict(v) for k, v in stored.items()}, at

    def resume(
        self, plant: PlantEngine, now: datetime
    ) -> tuple[list[Event], dict[str, str]] | None:
        """Restore `plant` from what is stored: None when nothing is; else the events of the
        restart (every equipment unknown from the last instant committed) and the equipment
        whose state could not be restored ({equipment: problem}; they start afresh)."""
        saved, accounted_us = self.load()
        if not saved:
            return None
        problems = plant.restore(saved)
        events: list[Event] = []
        # Up to the last committed instant the stored state is what the agent saw (any change
        # was committed when it happened); after it the machine was not observed while the
        # agent was down: that time is unknown.
        for engine in plant.engines.values():
            at = engine.cursor or now
            if accounted_us is not None and to_us(at) < accounted_us:
                at = from_us(accounted_us)
            events += engine.mark_unknown(at, "agent restarted")
        return events, problems

    def prepare(
        self, checkpoints: dict[str, dict[str, Any]], now_us: int, *, riding: bool = False
    ) -> StateWrite | None:
        """The state write for this flush, or None when nothing needs committing. `riding`:
        the flush commits events anyway, so a heartbeat half due goes with them rather than
        in a commit of its own later."""
        stored = dict(self._stored)
        entries: dict[WriteKind, dict[str, Any]] = {"full": {}, "keys": {}, "counts": {}}
        for eq, current in checkpoints.items():
            step = plan(stored.get(eq), current)
            if step is None:
                continue
            kind: WriteKind = step[0]
            before = stored.get(eq, {})
            entries[kind][eq] = _compact(before, step[1]) if kind == "keys" else step[1]
            stored[eq] = apply(before, kind, step[1])
        for eq in set(stored) - set(checkpoints):
            del stored[eq]  # no longer configured
        if self._snapshot_at is None:
            self._snapshot_at = now_us
        write: StateWrite | None = None
        body: dict[str, Any] = {
            _TAGS[kind]: found for kind, found in entries.items() if found and kind != "keys"
        }
        body.update(_group(entries["keys"]))
        if body:
            write = StateWrite(at=now_us, entry=encode(body))
        elif (
            self._last_at is None
            or now_us - self._last_at >= self.heartbeat_us
            or (riding and 2 * (now_us - self._last_at) >= self.heartbeat_us)
        ):
            write = StateWrite(at=now_us)
        # A fold that is due goes with a commit made anyway (a journal row, a heartbeat or
        # events), not in a commit of its own; only once twice overdue does it go alone.
        since = now_us - self._snapshot_at
        if (
            self._fold
            or (since >= self.snapshot_us and (write is not None or riding))
            or since >= 2 * self.snapshot_us
        ):
            snapshot: dict[str, bytes | None] = dict.fromkeys(self._on_disk)
            snapshot[SNAPSHOT_KEY] = encode(stored)
            write = StateWrite(at=now_us, snapshot=snapshot)
        if write is None:
            return None
        self._prepared = _Prepared(write, stored)
        return write

    def committed(self, write: StateWrite) -> None:
        """`write` (from the last prepare()) is on disk."""
        prepared = self._prepared
        if prepared is None or prepared.write is not write:
            return
        self._prepared = None
        self._stored = prepared.stored
        self._last_at = write.at
        if write.snapshot is not None:
            self._on_disk = {k for k, v in write.snapshot.items() if v is not None}
            self._snapshot_at = write.at
            self._fold = False
