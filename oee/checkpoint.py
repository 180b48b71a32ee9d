"""What of an equipment's checkpoint must reach the disk, and in what form.

An equipment checkpoint (EquipmentEngine.checkpoint()) changes at every tick: the cursor and
the time classes of the open buckets grow with the clock. Those parts are a function of the
rest: from a checkpoint taken at T0, accounting up to T1 with the same state, reason and
buckets gives the checkpoint at T1 to the microsecond (mark_unknown(T1) does this on a
restart). So a checkpoint only has to be stored again when something else changed:

- nothing but time (`cursor`, `seen`, time classes, pending stop time, reason durations):
  no write; a restart accounts the time from the stored state up to the last instant the
  agent committed (its heartbeat);
- only counters and the part quantities of buckets that were already stored (a part was
  counted): a small `counts` patch with those values and the timestamps of the counter
  samples that set them;
- anything else (a state change, a bucket opened or closed, a reason or product change, a
  stop judged): the top-level keys that differ from what is stored, and those no longer
  there (`keys`); the whole checkpoint (`full`) only when nothing is stored yet. Of `seen`,
  a `keys` write carries only the signals whose values changed (a timestamp that moved alone
  is clock, as in the first case), all of them while a scan is held. An idle machine whose
  bucket closes writes its cursor, its new bucket and its shift totals, about a third of its
  whole state.

Every event the engine emits comes with one of the last three, so a stored checkpoint and
the events committed with it always agree.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from oee.components import IDEAL_FIELDS, QUANTITY_FIELDS, TIME_FIELDS

WriteKind = Literal["full", "keys", "counts"]
_TIME = frozenset(TIME_FIELDS)
_COUNTED = frozenset(QUANTITY_FIELDS) | frozenset(IDEAL_FIELDS)
_CLOCKED_KEYS = ("cursor", "seen")
_BUCKET_CLOCKED = ("reasons", "pending")
_BUCKET_COUNTED = "parts"  # parts counted in the bucket by any counter (beside its values)


def _without_time(checkpoint: dict[str, Any], *, counted: bool) -> dict[str, Any]:
    """The checkpoint less what grows with the clock (and, with `counted`, less counts)."""
    out = {
        k: v
        for k, v in checkpoint.items()
        if k not in _CLOCKED_KEYS and not (counted and k == "counters")
    }
    buckets = []
    for bucket in checkpoint.get("buckets", []):
        skip = _TIME | _COUNTED if counted else _TIME
        b = {
            k: v
            for k, v in bucket.items()
            if k not in _BUCKET_CLOCKED and k != "values" and not (counted and k == _BUCKET_COUNTED)
        }
        b["values"] = {k: v for k, v in bucket.get("values", {}).items() if k not in skip}
        buckets.append(b)
    if buckets:
        out["buckets"] = buckets
    return out


def _keys_patch(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """{"set": keys of `current` that differ from `stored`, "drop": keys it no longer has}."""
    changed: dict[str, Any] = {}
    for key, value in current.items():
        if key == "seen":
            old = stored.get("seen", {})
            held = "scan" in current  # a held scan's samples must stay recorded with their time
            seen = {
                sig: entry
                for sig, entry in value.items()
                if sig not in old or old[sig][1] != entry[1] or (held and old[sig] != entry)
            }
            if seen:
                changed["seen"] = seen
        elif stored.get(key) != value:
            changed[key] = value
    patch: dict[str, Any] = {"set": changed}
    dropped = [key for key in stored if key not in current]
    if dropped:
        patch["drop"] = dropped
    return patch


def plan(stored: dict[str, Any] | None, current: dict[str, Any]) -> tuple[WriteKind, Any] | None:
    """What to write so that the stored checkpoint stands for `current`: None (nothing),
    ("counts", patch), ("keys", patch) or ("full", current)."""
    if stored is None:
        return "full", current
    if _without_time(stored, counted=False) == _without_time(current, counted=False):
        return None
    if _without_time(stored, counted=True) != _without_time(current, counted=True):
        return "keys", _keys_patch(stored, current)
    counters = current.get("counters", {})
    old_counters = stored.get("counters", {})
    changed = {k: v for k, v in counters.items() if old_counters.get(k) != v}
    seen = current.get("seen", {})
    patch: dict[str, Any] = {}
    if changed:
        patch["counters"] = changed
        patch["seen"] = {k: seen[k] for k in changed if k in seen}
    old_buckets = {b["start"]: b for b in stored.get("buckets", [])}
    values: dict[str, dict[str, int]] = {}
    for bucket in current.get("buckets", []):
        old_bucket = old_buckets.get(bucket["start"], {})
        old = {**old_bucket.get("values", {}), _BUCKET_COUNTED: old_bucket.get(_BUCKET_COUNTED, 0)}
        new = {**bucket.get("values", {}), _BUCKET_COUNTED: bucket.get(_BUCKET_COUNTED, 0)}
        diff = {
            k: new.get(k, 0) for k in (*_COUNTED, _BUCKET_COUNTED) if new.get(k, 0) != old.get(k, 0)
        }
        if diff:
            values[str(bucket["start"])] = diff
    if values:
        patch["values"] = values
    return "counts", patch


def apply(stored: dict[str, Any], kind: WriteKind, payload: Any) -> dict[str, Any]:
    """The stored checkpoint after a write of `plan()` (a new dict; `stored` is unchanged)."""
    if kind == "full":
        # A copy: the engine's checkpoint shares some of its live containers.
        return copy.deepcopy(payload)
    if kind == "keys":
        dropped = set(payload.get("drop", ()))
        out = {k: v for k, v in stored.items() if k not in dropped}
        for key, value in copy.deepcopy(payload["set"]).items():
            out[key] = {**stored.get("seen", {}), **value} if key == "seen" else value
        return out
    out = dict(stored)
    if "counters" in payload:
        out["counters"] = {**stored.get("counters", {}), **payload["counters"]}
        out["seen"] = {**stored.get("seen", {}), **payload.get("seen", {})}
    values = payload.get("values", {})
    if values:
        buckets = []
        for bucket in stored.get("buckets", []):
            diff = dict(values.get(str(bucket["start"]), {}))
            if diff:
                out_bucket = dict(bucket)
                if _BUCKET_COUNTED in diff:
                    out_bucket[_BUCKET_COUNTED] = diff.pop(_BUCKET_COUNTED)
                merged = {**bucket.get("values", {}), **diff}
                out_bucket["values"] = {k: v for k, v in merged.items() if v}
                buckets.append(out_bucket)
            else:
                buckets.append(bucket)
        out["buckets"] = buckets
    return out
