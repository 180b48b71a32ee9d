"""`cloud-api agents config push|list|show|diff|rollback|publish`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cloud_api.access import audit
from cloud_api.config import CloudSettings, load_settings
from cloud_api.db import command_connection
from cloud_api.fleetconfig import store
from cloud_api.fleetconfig.publish import PublishError
from cloud_api.fleetconfig.routes import publish_current


def _fail(message: str, code: int = 2) -> int:
    print(f"cloud-api: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace) -> CloudSettings:
    settings = load_settings(args.config)
    if getattr(args, "keys_dir", None):
        settings.keys_dir = Path(args.keys_dir)
    return settings


def _publish(settings: CloudSettings, agent: str) -> int:
    with command_connection(settings.database) as conn, conn.transaction():
        found = store.current(conn, agent)
    if found is None:
        return _fail(f"agent {agent} has no configuration version yet")
    try:
        topic = publish_current(settings, found)
    except PublishError as exc:
        return _fail(
            f"version {found.version} is stored and current but not published: {exc}; "
            f"run `cloud-api agents config publish --agent {agent}` once the broker is back",
            1,
        )
    with command_connection(settings.database) as conn, conn.transaction():
        store.mark_published(conn, agent, found.serial)
    print(
        f"published version {found.version} of {agent} (publication {found.serial}"
        f"{', rollback' if found.rollback else ''}) on {topic}"
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"{args.file}: {exc}")
    started = time.monotonic()
    try:
        with command_connection(settings.database) as conn, conn.transaction():
            actor = audit.cli_actor()
            site, version, serial = store.push(
                conn, args.agent, text, author=actor, comment=args.comment
            )
            audit.record_cli(
                conn,
                "agents.config.push",
                target=args.agent,
                site_id=site,
                detail={"version": version, "serial": serial, "comment": args.comment},
            )
    except (store.ConfigRefused, store.UnknownAgent) as exc:
        return _fail(f"{args.file}: {exc}")
    print(f"stored version {version} of {args.agent} ({site})")
    code = _publish(settings, args.agent)
    if code == 0 and args.wait:
        return _wait(settings, args.agent, version, serial, args.wait, started)
    return code


def _wait(
    settings: CloudSettings, agent: str, version: int, serial: int, limit: float, started: float
) -> int:
    """Until the agent reports an outcome for this publication (through ingest)."""
    deadline = started + limit
    while time.monotonic() < deadline:
        with command_connection(settings.database) as conn, conn.transaction():
            row = conn.execute(
                "SELECT body->'data' FROM facts.events WHERE kind = 'agent' AND agent_id = %s"
                " AND equipment_id IS NULL AND body->>'code' = %s"
                " AND (body->'data'->>'serial')::int = %s ORDER BY ts DESC LIMIT 1",
                (agent, store.RESULT_CODE, serial),
            ).fetchone()
        if row is not None:
            data: dict[str, Any] = row[0]
            print(
                f"{data.get('result')} after {time.monotonic() - started:.1f} s"
                + (f": {data.get('reason')}" if data.get("reason") else "")
            )
            for problem in data.get("problems") or []:
                line = f" (line {problem['line']})" if problem.get("line") else ""
                print(f"  {problem.get('path')}{line}: {problem.get('reason')}")
            return 0 if data.get("result") == "applied" else 1
        time.sleep(0.5)
    return _fail(f"no outcome from {agent} for version {version} within {limit:.0f} s", 1)


def cmd_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        with command_connection(settings.database) as conn, conn.transaction():
            site = store.agent_site(conn, args.agent)
            rows = store.versions(conn, args.agent)
            status = store.status(conn, args.agent)
    except store.UnknownAgent as exc:
        return _fail(str(exc))
    last = status["last_result"] or {}
    print(
        f"{args.agent} ({site}): desired {status['desired_version']}, running "
        f"{status['running_version']}, last result {last.get('result')} "
        f"(version {last.get('version')})"
    )
    for r in rows:
        mark = "*" if r["current"] else " "
        print(
            f"{mark} {r['version']:>4}  {r['created_at']:%Y-%m-%d %H:%M:%S}  {r['author']}"
            f"  {r['digest'][:12]}  {r['comment']}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        with command_connection(settings.database) as conn, conn.transaction():
            if args.diff_from is not None:
                print(store.diff(conn, args.agent, args.diff_from, args.version), end="")
                return 0
            row = store.show(conn, args.agent, args.version)
    except store.UnknownAgent as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({k: str(v) if k == "created_at" else v for k, v in row.items()}))
    else:
        print(row["yaml"], end="" if row["yaml"].endswith("\n") else "\n")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        with command_connection(settings.database) as conn, conn.transaction():
            site, serial = store.rollback(conn, args.agent, args.to, actor=audit.cli_actor())
            audit.record_cli(
                conn,
                "agents.config.rollback",
                target=args.agent,
                site_id=site,
                detail={"version": args.to, "serial": serial},
            )
    except (store.ConfigRefused, store.UnknownAgent) as exc:
        return _fail(str(exc))
    return _publish(settings, args.agent)


def cmd_publish(args: argparse.Namespace) -> int:
    return _publish(_settings(args), args.agent)


def register(agents: Any) -> None:
    """Add `config ...` under `cloud-api agents`."""
    config = agents.add_parser("config", help="configuration versions pushed to an agent")
    sub = config.add_subparsers(dest="agents_config", required=True)
    p = sub.add_parser("push", help="store a new version, make it current and publish it")
    p.add_argument("--agent", required=True)
    p.add_argument("--file", required=True, help="the agent's YAML (${ENV} references stay)")
    p.add_argument("--comment", default="", help="why (kept with the version, audited)")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the agent's outcome (applied, rejected, rolled back)",
    )
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("list", help="versions, the desired and running one, the last result")
    p.add_argument("--agent", required=True)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="print one version's YAML (or a diff)")
    p.add_argument("--agent", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--diff-from", type=int, help="print a unified diff from this version")
    p.add_argument("--json", action="store_true", help="with author, time, comment, trace id")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("rollback", help="make an earlier version current again and publish it")
    p.add_argument("--agent", required=True)
    p.add_argument("--to", type=int, required=True)
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("publish", help="publish the current version again")
    p.add_argument("--agent", required=True)
    p.set_defaults(func=cmd_publish)
