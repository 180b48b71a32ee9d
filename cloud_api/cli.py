"""`cloud-api`: migrate the database, run ingest and the HTTP API, manage keys and agents."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg

from cloud_api import tracing
from cloud_api.access import audit
from cloud_api.access import cli as security_cli
from cloud_api.alerts import cli as alerts_cli
from cloud_api.config import CloudSettings, ConfigError, load_settings
from cloud_api.db import command_connection
from cloud_api.fleetconfig import cli as fleetconfig_cli
from common.logs import configure_logging
from sync.keys import (
    SUITES,
    CloudKeyring,
    KeyFileError,
    ed25519_key_id,
    generate_cloud_ack_key,
    generate_cloud_hpke_keys,
    parse_ed25519_public,
)
from sync.version import VERSION


def _fail(message: str, code: int = 2) -> int:
    print(f"cloud-api: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace) -> CloudSettings:
    settings = load_settings(args.config)
    if getattr(args, "keys_dir", None):
        settings.keys_dir = Path(args.keys_dir)
    return settings


def _database_exists(url: str, name: str) -> bool | None:
    """Whether the server at `url` has database `name` (None: cannot tell), asked through
    its maintenance database: a failed connect does not say why in a form to rely on."""
    from psycopg.conninfo import make_conninfo

    try:
        with psycopg.connect(make_conninfo(url, dbname="postgres"), connect_timeout=10) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return row.fetchone() is not None
    except psycopg.Error:
        return None


def cmd_migrate(args: argparse.Namespace) -> int:
    from psycopg.conninfo import conninfo_to_dict

    from cloud_api.db import migrate

    settings = _settings(args)
    url = settings.database.require_url()
    where = settings.database.describe()
    info = conninfo_to_dict(url)
    name = str(info.get("dbname") or info.get("user") or "")
    try:
        applied = migrate(url)
    except psycopg.OperationalError:
        if _database_exists(url, name) is not False:
            raise
        return _fail(
            f"{where} does not exist; migrate creates the tables, not the database. Create "
            f"it first, as a PostgreSQL user allowed to: `createdb {name}` or, in psql, "
            f'`CREATE DATABASE "{name}";`'
        )
    print(
        f"{where}: applied {len(applied)} migration(s): {', '.join(applied)}"
        if applied
        else f"{where} is up to date"
    )
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    settings = _settings(args)
    months = args.keep_months or settings.retention_months
    if months is None:
        return _fail("no retention: pass --keep-months or set retention_months")
    with command_connection(settings.database) as conn, conn.transaction():
        dropped = [
            r[0]
            for r in conn.execute(
                "SELECT * FROM ops.drop_partitions_before("
                "date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
                " - make_interval(months => %s))",
                (months,),
            ).fetchall()
        ]
    print(
        f"dropped {len(dropped)} partition(s): {', '.join(dropped)}"
        if dropped
        else "nothing to drop"
    )
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    settings = _settings(args)
    directory = settings.keys_dir
    os.umask(0o077)
    if list(directory.glob("hpke-*.key")) and not args.rotate:
        print(
            f"{directory} already holds keys (use --rotate to add new current keys)",
            file=sys.stderr,
        )
    else:
        suites = list(SUITES) if args.suite == "all" else [args.suite]
        generate_cloud_hpke_keys(directory, suites)
        if not args.keep_ack_key:
            generate_cloud_ack_key(directory)
    return cmd_keys_export(args)


def cmd_keys_export(args: argparse.Namespace) -> int:
    settings = _settings(args)
    ring = CloudKeyring.load(settings.keys_dir)
    print("# cloud public keys: the current HPKE key per suite, then every ack-verify key")
    for key in ring.current_hpke_keys:
        print(key.public.to_line())
    for _kid, verify in ring.ack_verify_keys().items():
        from sync.keys import ed25519_line

        print(ed25519_line(verify))
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    settings = _settings(args)
    line = Path(args.public_key).read_text(encoding="utf-8").strip()
    try:
        key = parse_ed25519_public(line)
    except KeyFileError as exc:
        return _fail(f"{args.public_key}: {exc}")
    kid = ed25519_key_id(key)
    with command_connection(settings.database) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO registry.sites(site_id) VALUES (%s) ON CONFLICT DO NOTHING", (args.site,)
        )
        row = conn.execute(
            "SELECT site_id FROM registry.agents WHERE agent_id = %s", (args.agent,)
        ).fetchone()
        if row is not None and row[0] != args.site:
            return _fail(f"agent {args.agent} is enrolled at site {row[0]}, not {args.site}")
        conn.execute(
            "INSERT INTO registry.agents(agent_id, site_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (args.agent, args.site),
        )
        conn.execute(
            "INSERT INTO registry.agent_keys(agent_id, key_id, public_key) VALUES (%s, %s, %s) "
            "ON CONFLICT (agent_id, key_id) DO UPDATE SET revoked_at = NULL",
            (args.agent, kid, line),
        )
        audit.record_cli(
            conn,
            "agents.enroll",
            target=args.agent,
            site_id=args.site,
            detail={"key_id": kid},
        )
    print(f"enrolled agent {args.agent} at site {args.site} with key {kid}")
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with command_connection(settings.database) as conn, conn.transaction():
        live = conn.execute(
            "SELECT key_id FROM registry.agent_keys WHERE agent_id = %s AND revoked_at IS NULL",
            (args.agent,),
        ).fetchall()
        if args.key_id not in {r[0] for r in live}:
            return _fail(f"agent {args.agent} has no active key {args.key_id}")
        if len(live) == 1 and not args.last:
            return _fail(
                f"{args.key_id} is the last active key of {args.agent}; "
                "enroll the new key first (or pass --last)"
            )
        conn.execute(
            "UPDATE registry.agent_keys SET revoked_at = now() WHERE agent_id = %s AND key_id = %s",
            (args.agent, args.key_id),
        )
        audit.record_cli(
            conn,
            "agents.revoke_key",
            target=args.agent,
            detail={"key_id": args.key_id},
        )
    print(f"revoked key {args.key_id} of agent {args.agent}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from cloud_api.db import make_pool
    from cloud_api.ingest.worker import BatchWriter, IngestWorker
    from sync.uplink import BrokerSettings

    settings = _settings(args)
    configure_logging(args.log_level)
    ring = CloudKeyring.load(settings.keys_dir)
    tracing.configure(settings.tracing)
    print(f"cloud-api: {settings.database.describe()}", file=sys.stderr)
    # Connections back in the pool within a second are not checked again (a round trip each).
    # The batch statements are the same each time: prepared on the server, they are planned
    # once per connection instead of at every batch (ingest connects to PostgreSQL directly,
    # never through a transaction-mode pooler).
    pool = make_pool(
        settings.database,
        name="ingest",
        role=settings.security.ingest_db_role,
        check_idle_s=1.0,
        prepare=True,
    )
    store = BatchWriter(
        pool,
        ring,
        topic_prefix=settings.mqtt.topic_prefix,
        max_envelope_bytes=settings.max_envelope_bytes,
    )
    m = settings.mqtt
    worker = IngestWorker(
        store,
        BrokerSettings(
            **m.endpoints(),
            username=m.username,
            password=m.password,
            tls=m.tls,
            ca_file=m.ca_file,
        ),
        share_group=m.share_group,
        workers=args.workers,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.start()
    stop.wait()
    worker.stop()
    pool.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cloud_api.api.app import create_app

    settings = _settings(args)
    configure_logging(args.log_level)
    print(f"cloud-api: {settings.database.describe()}", file=sys.stderr)
    http = settings.http
    workers = args.workers or http.workers
    options: dict[str, Any] = {
        "host": args.host or http.host,
        "port": args.port or http.port,
        "loop": http.loop,
        "backlog": http.backlog,
        "log_level": "warning",
        "access_log": False,
    }
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return 0
    # Worker processes import the app factory and read the same settings.
    if args.config:
        os.environ["CLOUD_CONFIG"] = str(Path(args.config).resolve())
    if getattr(args, "keys_dir", None):
        os.environ["CLOUD_KEYS_DIR"] = str(Path(args.keys_dir).resolve())
    from cloud_api.api.serving import Supervisor

    config = uvicorn.Config("cloud_api.asgi:app", factory=True, **options)
    supervisor = Supervisor(config, workers)
    try:
        supervisor.bind()
    except OSError as exc:
        where = f"[{config.host}]" if ":" in config.host else config.host
        print(f"cannot listen on {where}:{config.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return supervisor.run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloud-api", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument(
        "--config",
        default=os.environ.get("CLOUD_CONFIG") or None,
        help="cloud YAML (default: $CLOUD_CONFIG, as the API's workers read it; CLOUD_* "
        "environment variables override)",
    )
    parser.add_argument("--keys-dir", help="directory of the cloud's keys")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="apply pending SQL migrations").set_defaults(func=cmd_migrate)

    p = sub.add_parser("retention", help="drop monthly fact partitions older than the retention")
    p.add_argument("--keep-months", type=int, help="whole months kept before the current one")
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("ingest", help="run the ingest worker")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("serve", help="run the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="worker processes (default: http.workers)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="cloud keys").add_subparsers(dest="keys", required=True)
    p = keys.add_parser("init", help="create the HPKE and ack-signing keys; prints the public keys")
    p.add_argument(
        "--suite",
        choices=[*SUITES, "all"],
        default=SUITES[0],
        help="HPKE suite of the new key; `all` publishes one key per suite",
    )
    p.add_argument("--rotate", action="store_true", help="add new current keys, keep old ones")
    p.add_argument(
        "--keep-ack-key",
        action="store_true",
        help="rotate only the HPKE key(s); the ack-signing key stays current",
    )
    p.set_defaults(func=cmd_keys_init)
    keys.add_parser("export", help="print the public keys for agents").set_defaults(
        func=cmd_keys_export
    )

    agents = sub.add_parser("agents", help="fleet").add_subparsers(dest="agents", required=True)
    p = agents.add_parser("enroll", help="accept batches from an agent")
    p.add_argument("--agent", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--public-key", required=True, help="the agent's signing.pub")
    p.set_defaults(func=cmd_enroll)
    p = agents.add_parser(
        "revoke-key", help="stop accepting batches signed by one of an agent's keys"
    )
    p.add_argument("--agent", required=True)
    p.add_argument("--key-id", required=True)
    p.add_argument("--last", action="store_true", help="allow revoking the agent's last key")
    p.set_defaults(func=cmd_revoke_key)
    fleetconfig_cli.register(agents)
    security_cli.register(sub)
    alerts_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (ConfigError, KeyFileError) as exc:
        return _fail(str(exc))
    except psycopg.OperationalError as exc:
        return _fail(f"cannot reach the database: {str(exc).strip().splitlines()[0]}", 3)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
