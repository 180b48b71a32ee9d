"""Targets beside values: which target of OEE or another KPI applies to a scope or group.

Targets live in registry.targets (migration 0037): from the agents' YAML (source `config`)
and from `PUT /v1/targets` (source `api`, which overrides `config` at the same scope). Per KPI
the most specific scope that has a target wins: equipment > line > site (oee.targets).
Beside `targets` ({kpi: value}) answers carry `against_targets`: per KPI the target, the KPI's
direction (`better`: higher or lower) and whether the value meets it (`met`), judged by
oee.targets.judge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud_api.api.queries import Conn, Member, targets_rows
from oee.kpis import KpiValue
from oee.targets import effective, judge

Layer = dict[str, float]
_SOURCE_RANK = {"config": 0, "api": 1}


@dataclass
class TargetBook:
    """The targets of some sites: (site, scope, scope id) -> {kpi: value}."""

    layers: dict[tuple[str, str, str], Layer] = field(default_factory=dict)

    def of_equipment(self, site: str, equipment: str, line: str | None) -> Layer:
        return effective(
            [
                self.layers.get((site, "site", "")),
                self.layers.get((site, "line", line)) if line is not None else None,
                self.layers.get((site, "equipment", equipment)),
            ]
        )

    def of_line(self, site: str, line: str | None) -> Layer:
        return effective(
            [
                self.layers.get((site, "site", "")),
                self.layers.get((site, "line", line)) if line is not None else None,
            ]
        )

    def of_site(self, site: str) -> Layer:
        return effective([self.layers.get((site, "site", ""))])

    def of_group(
        self, group_by: str, key: tuple[str | None, str | None], members: Sequence[Member]
    ) -> Layer:
        """The targets of one group of a series answer (`key` as the series groups it)."""
        site, ident = key
        if group_by == "none" or site is None:
            return {}
        if group_by == "site":
            return self.of_site(site)
        if group_by == "line":
            return self.of_line(site, ident)
        line = next(
            (m.line_id for m in members if m.site_id == site and m.equipment_id == ident), None
        )
        return self.of_equipment(site, ident or "", line)

    def of_scope(self, kind: str, ident: str, members: Sequence[Member]) -> Layer:
        """The targets of a queried scope; none when its equipment span several sites."""
        sites = {m.site_id for m in members}
        if len(sites) != 1:
            return {}
        (site,) = sites
        if kind == "equipment":
            line = members[0].line_id if len(members) == 1 else None
            return self.of_equipment(site, ident, line)
        if kind == "line":
            return self.of_line(site, ident)
        return self.of_site(site)


def load(conn: Conn, sites: Iterable[str]) -> TargetBook:
    """Every target of `sites` (api over config within a scope)."""
    members = [Member(site, "", None) for site in sites]
    return book_of(targets_rows(conn, members))


def book_of(rows: list[dict[str, Any]]) -> TargetBook:
    """The book of rows of registry.targets (queries.targets_rows)."""
    book = TargetBook()
    rows = sorted(rows, key=lambda r: _SOURCE_RANK.get(r["source"], 0))
    for r in rows:
        book.layers.setdefault((r["site_id"], r["scope"], r["scope_id"]), {})[r["kpi"]] = float(
            r["value"]
        )
    return book


def only(targets: Layer, names: Iterable[str]) -> Layer:
    """The targets of the values an answer shows."""
    shown = set(names)
    return {k: v for k, v in targets.items() if k in shown}


def beside(values: Mapping[str, KpiValue], targets: Layer) -> dict[str, Any]:
    """What an answer carries beside `values`: `targets` and `against_targets`."""
    return {"targets": targets, "against_targets": judge(values, targets)}
