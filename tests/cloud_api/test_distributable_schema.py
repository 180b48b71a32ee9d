"""The schema stays distributable by site (README "Scale out": PostgreSQL with Citus).

After all migrations, read from `information_schema`:
- every table is classified: distributed by `site_id`, or named below as a reference table
  (replicated to every node) or a coordinator table, with the reason it has no site key;
- a distributed table has `site_id` NOT NULL, in its primary key and in every unique
  constraint and unique index (a shard can only enforce a key that holds the distribution
  column);
- no foreign key crosses sites: one that points at a distributed table comes from a
  distributed table and pairs `site_id` with `site_id`; a reference table points only at
  reference tables; between two tables that both carry `site_id`, a key that does not pair
  them is listed below with its reason;
- every distributed table the API role reads is under row-level security;
and from the source: every place the API's SQL reads a distributed table restricts it by
site (a `site_id` predicate, a join on `site_id` with the request's scope, or the sites
handed to a set-returning function), so each API query goes to the shards of its sites.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

import cloud_api
from cloud_api.api import queries

SCHEMAS = ("alerts", "audit", "facts", "monitoring", "ops", "registry", "rollups")

# Distributed by site_id (Citus `create_distributed_table(..., 'site_id')`, co-located).
DISTRIBUTED = {
    "facts.events",
    "facts.oee_buckets",
    "facts.batches",
    "facts.annotations",
    "rollups.oee_1m",
    "rollups.oee_1h",
    "rollups.data_versions",
    "ops.agent_epochs",
    "ops.seq_gaps",
    "ops.declared_losses",
}

_REGISTRY = (
    "the registry: small, changed rarely, joined with the facts by every query; replicated "
    "to every node (Citus reference table)"
)
REFERENCE = {
    "registry.sites": _REGISTRY,
    "registry.agents": _REGISTRY,
    "registry.agent_keys": _REGISTRY + "; keys of an agent, who is bound to one site",
    "registry.equipment": _REGISTRY,
    "registry.lines": _REGISTRY,
    "registry.reason_codes": _REGISTRY,
    "registry.shift_calendars": _REGISTRY,
    "registry.targets": _REGISTRY,
    "registry.agent_configs": _REGISTRY + "; a few versions per agent",
    "registry.agent_config_current": _REGISTRY,
    "registry.agent_config_reported": _REGISTRY,
}

COORDINATOR = {
    "alerts.rules": "a rule may watch every site (site_id NULL); a few rows",
    "alerts.alerts": "raised by a rule, which may be fleet-wide; follows its rule",
    "alerts.deliveries": "the notification queue of the alerts; follows them",
    "audit.records": "who did what; many actions concern no site (keys, users, the fleet)",
    "monitoring.request_stats": "the API's own request counters; no site",
    "ops.api_keys": "credentials; a key may reach several sites or all",
    "ops.credential_stamp": "one row: the version of the credentials; no site",
    "ops.revoked_tokens": "credentials; no site",
    "ops.revoked_token_keys": "credentials; no site",
    "ops.schema_migrations": "the schema's own history; no site",
    "ops.quarantine": "payloads refused before their site could be trusted (unverified)",
    "ops.reject_counts": "refusals by agent and reason, counted before the site is trusted",
}

# Foreign keys between tables that both carry site_id but do not pair it, with the reason.
UNPAIRED_KEYS = {
    ("alerts.alerts", "alerts.rules"): "a fleet-wide rule (site_id NULL) raises site alerts",
    ("alerts.deliveries", "alerts.alerts"): "a delivery belongs to its alert",
    ("registry.agent_configs", "registry.agents"): "agent_id names one agent fleet-wide",
    ("registry.agent_config_current", "registry.agents"): "agent_id names one agent",
    ("registry.agent_config_current", "registry.agent_configs"): "versions of one agent",
    ("registry.agent_config_reported", "registry.agents"): "agent_id names one agent",
}


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: str
    columns: tuple[tuple[str, str], ...]  # (column, referenced column)
    referenced: str


def _schema(
    pg_url: str,
) -> tuple[
    dict[str, dict[str, bool]],
    dict[str, str],
    dict[str, list[tuple[str, list[str]]]],
    list[ForeignKey],
    set[str],
]:
    """(table -> column -> nullable, partition -> parent, table -> [(key, columns)] of the
    primary key and every unique constraint or index, foreign keys, tables the API reads)."""
    with psycopg.connect(pg_url) as conn:
        columns: dict[str, dict[str, bool]] = defaultdict(dict)
        for schema, table, column, nullable in conn.execute(
            "SELECT c.table_schema, c.table_name, c.column_name, c.is_nullable = 'YES' "
            "FROM information_schema.columns c JOIN information_schema.tables t "
            "USING (table_schema, table_name) "
            "WHERE t.table_type = 'BASE TABLE' AND c.table_schema = ANY(%s)",
            (list(SCHEMAS),),
        ):
            columns[f"{schema}.{table}"][column] = nullable
        # Partitions are checked as what they are, parts of their parent.
        parents = {
            f"{r[0]}.{r[1]}": f"{r[2]}.{r[3]}"
            for r in conn.execute(
                "SELECT cn.nspname, c.relname, pn.nspname, p.relname FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace cn "
                "ON cn.oid = c.relnamespace JOIN pg_class p ON p.oid = i.inhparent "
                "JOIN pg_namespace pn ON pn.oid = p.relnamespace"
            )
        }
        keys: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
        for schema, table, name, cols in conn.execute(
            "SELECT tc.table_schema, tc.table_name, tc.constraint_name, "
            "array_agg(k.column_name::text ORDER BY k.ordinal_position) "
            "FROM information_schema.table_constraints tc "
            "JOIN information_schema.key_column_usage k USING (constraint_schema, "
            "constraint_name, table_name) "
            "WHERE tc.constraint_type IN ('PRIMARY KEY', 'UNIQUE') AND tc.table_schema = ANY(%s) "
            "GROUP BY 1, 2, 3",
            (list(SCHEMAS),),
        ):
            keys[f"{schema}.{table}"].append((name, list(cols)))
        # Unique indexes that are not constraints (partial, expression) are keys too; the
        # information schema does not show them.
        for schema, table, name, cols in conn.execute(
            "SELECT n.nspname, t.relname, i.relname, "
            "array(SELECT a.attname::text FROM unnest(x.indkey) k "
            "      LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k) "
            "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE x.indisunique AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
            "WHERE c.conindid = x.indexrelid) AND n.nspname = ANY(%s)",
            (list(SCHEMAS),),
        ):
            keys[f"{schema}.{table}"].append((name, [c for c in cols if c is not None]))
        fks: dict[tuple[str, str], list[tuple[int, str, str, str]]] = defaultdict(list)
        for (
            schema,
            table,
            name,
            position,
            column,
            ref_schema,
            ref_table,
            ref_column,
        ) in conn.execute(
            "SELECT k.table_schema, k.table_name, k.constraint_name, k.ordinal_position, "
            "k.column_name, u.table_schema, u.table_name, u.column_name "
            "FROM information_schema.referential_constraints r "
            "JOIN information_schema.key_column_usage k USING (constraint_schema, "
            "constraint_name) "
            "JOIN information_schema.key_column_usage u "
            "ON u.constraint_schema = r.unique_constraint_schema "
            "AND u.constraint_name = r.unique_constraint_name "
            "AND u.ordinal_position = k.position_in_unique_constraint "
            "WHERE k.table_schema = ANY(%s)",
            (list(SCHEMAS),),
        ):
            fks[(f"{schema}.{table}", name)].append(
                (position, column, ref_column, f"{ref_schema}.{ref_table}")
            )
        foreign = [
            ForeignKey(
                name=name,
                table=table,
                columns=tuple((c, rc) for _, c, rc, _ in sorted(parts)),
                referenced=parts[0][3],
            )
            for (table, name), parts in fks.items()
        ]
        api_reads = {
            f"{r[0]}.{r[1]}"
            for r in conn.execute(
                "SELECT table_schema, table_name FROM information_schema.role_table_grants "
                "WHERE grantee = 'gateway_api' AND privilege_type = 'SELECT'"
            )
        }
        secured = {
            f"{r[0]}.{r[1]}"
            for r in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relrowsecurity"
            )
        }
    return columns, parents, keys, foreign, api_reads - secured


def _kind(table: str, parents: dict[str, str]) -> str:
    table = parents.get(table, table)
    if table in DISTRIBUTED:
        return "distributed"
    return "reference" if table in REFERENCE else "coordinator"


def test_every_table_is_distributed_by_site_or_named_with_the_reason(pg_url: str) -> None:
    columns, parents, keys, foreign, unsecured = _schema(pg_url)
    tables = {t for t in columns if t not in parents}
    named = DISTRIBUTED | set(REFERENCE) | set(COORDINATOR)
    assert tables - named == set(), "classify each new table: distributed, reference or local"
    assert named - tables == set(), "a classified table no longer exists"
    assert not (DISTRIBUTED & set(REFERENCE) or DISTRIBUTED & set(COORDINATOR))

    problems: list[str] = []
    for table in sorted(columns):
        if _kind(table, parents) != "distributed":
            continue
        if columns[table].get("site_id") is not False:
            problems.append(f"{table}: no site_id NOT NULL column")
        names = [name for name, _ in keys[table]]
        if not any(name.endswith("pkey") for name in names):
            problems.append(f"{table}: no primary key")
        for name, cols in keys[table]:
            if "site_id" not in cols:
                problems.append(f"{table}: key {name} {cols} lacks site_id")
    for fk in foreign:
        source, target = _kind(fk.table, parents), _kind(fk.referenced, parents)
        pairs_site = ("site_id", "site_id") in fk.columns
        if target == "distributed" and (source != "distributed" or not pairs_site):
            problems.append(f"{fk.table}.{fk.name}: points into {fk.referenced} across sites")
        if source == "reference" and target != "reference":
            problems.append(f"{fk.table}.{fk.name}: a reference table points at {target} data")
        both_sited = "site_id" in columns[fk.table] and "site_id" in columns[fk.referenced]
        listed = (parents.get(fk.table, fk.table), fk.referenced) in UNPAIRED_KEYS
        if both_sited and not pairs_site and not listed:
            problems.append(f"{fk.table}.{fk.name} -> {fk.referenced} does not pair site_id")
    for table in sorted(unsecured):
        if _kind(table, parents) == "distributed":
            problems.append(f"{table}: the API reads it without row-level security")
    assert problems == []


# -- the API's query texts ------------------------------------------------------------------

# The modules whose SQL the API process runs (command-line modules are not the API).
API_PACKAGES = ("api", "fleetconfig", "alerts", "access")
_TABLE = r"(?:facts|rollups|ops)\.(?:\w+|\{\w+\})"
# Reads and changes of rows; an INSERT carries its site_id in the row it writes.
_READ = re.compile(rf"\b(?:FROM|JOIN|UPDATE)\s+({_TABLE})", re.IGNORECASE)
# What restricts the rows read to sites: a site_id predicate, a join on site_id (with the
# request's scope, itself resolved through the site filter of _scope_sql), or the sites
# handed to a set-returning function.
_BY_SITE = re.compile(
    r"site_id\s*=|site_id\s+IN\b|USING\s*\(\s*site_id|^\s*\(\s*%\(sites\)s", re.IGNORECASE
)


def _texts(path: Path) -> list[tuple[int, str]]:
    """Every string literal of a module (adjacent literals are one), with its line; the
    literal parts of an f-string joined around `{}`."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            out.append((node.lineno, "".join(str(p) for p in parts)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def _distributed_reads(text: str) -> list[tuple[str, str]]:
    """(table, the text from it to the next table read) for each distributed table read."""
    found = list(_READ.finditer(text))
    out = []
    for i, match in enumerate(found):
        table = match.group(1)
        name = table if "{" not in table else table.split(".")[0] + ".*"
        # facts and rollups hold site data only: their functions read it too.
        if name in DISTRIBUTED or name.split(".")[0] in ("facts", "rollups"):
            end = found[i + 1].start() if i + 1 < len(found) else len(text)
            out.append((name, text[match.end() : end]))
    return out


def test_every_query_of_the_api_reads_distributed_tables_by_site() -> None:
    root = Path(cloud_api.__file__).parent
    modules = [
        path
        for package in API_PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if path.name != "cli.py"
    ]
    reads = 0
    problems = []
    for path in modules:
        for line, text in _texts(path):
            for table, rest in _distributed_reads(text):
                reads += 1
                if not _BY_SITE.search(rest):
                    problems.append(f"{path.relative_to(root)}:{line}: {table}: {text[:160]!r}")
    assert reads >= 10, "the API's queries were not found: the check reads nothing"
    assert problems == []
    # The request scope every `JOIN scope ... USING (site_id, ...)` uses comes from here.
    for kind in ("site", "line", "equipment"):
        assert "site_id = ANY(%(sites)s)" in queries._scope_sql(kind)


@pytest.mark.parametrize(
    ("text", "restricted"),
    [
        ("SELECT * FROM facts.events e WHERE e.site_id = ANY(%(sites)s)", True),
        ("SELECT * FROM facts.events e JOIN scope s USING (site_id, equipment_id)", True),
        ("SELECT * FROM facts.stop_reason_moves(%(sites)s, %(eqs)s)", True),
        ("SELECT * FROM facts.batches b WHERE b.agent_id = a.agent_id", False),
        ("SELECT bucket FROM rollups.{table} WHERE equipment_id = %(eq)s", False),
        (
            "SELECT 1 FROM facts.events WHERE site_id = %s UNION SELECT 1 FROM facts.batches",
            False,
        ),
    ],
)
def test_the_query_check_tells_a_site_restricted_read_from_one_that_is_not(
    text: str, restricted: bool
) -> None:
    reads = _distributed_reads(text)
    assert reads
    assert all(_BY_SITE.search(rest) for _, rest in reads) is restricted
