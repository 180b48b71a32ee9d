"""`cloud-api tokens|apikeys|pii|audit ...`: credentials, personal-data keys and the audit trail.

Every command that changes something writes its audit row in the same transaction as the
change (token issue: the row is committed before the token is printed). Secrets are printed
once on stdout and never written to logs or audit rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_api.access import audit
from cloud_api.access.auth import (
    ROLES,
    SCOPES,
    AuthError,
    TokenKeyring,
    generate_token_key,
    issue_token,
    new_api_key,
    parse_duration,
    parse_role,
    parse_sites,
)
from cloud_api.access.pii import generate_pii_key
from cloud_api.config import CloudSettings, load_settings
from cloud_api.db import command_connection


def _settings(args: argparse.Namespace) -> CloudSettings:
    settings = load_settings(args.config)
    if getattr(args, "keys_dir", None):
        settings.keys_dir = Path(args.keys_dir)
    return settings


def _fail(message: str) -> int:
    print(f"cloud-api: {message}", file=sys.stderr)
    return 2


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def cmd_tokens_issue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        role = parse_role(args.role)
        sites = parse_sites(_csv(args.sites))
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        return _fail(str(exc))
    directory = settings.keys_dir
    ring = TokenKeyring.load(directory) if directory.is_dir() else None
    if ring is None or ring.current_id is None:
        # A key made here would sign tokens that no running API knows: creating keys is
        # an explicit command, and the message says where this one looked.
        return _fail(
            f"no current token signing key in {directory} "
            f"({'the folder does not exist' if ring is None else 'no jwt-*.key there'}); "
            "point --keys-dir or CLOUD_KEYS_DIR at the API's keys folder, or create a key "
            "there with `cloud-api tokens rotate-key`"
        )
    with command_connection(settings.database) as conn, conn.transaction():
        if conn.execute(
            "SELECT 1 FROM ops.revoked_token_keys WHERE kid = %s", (ring.current_id,)
        ).fetchone():
            return _fail(
                f"the current signing key {ring.current_id} is revoked: "
                "run `cloud-api tokens rotate-key`"
            )
        try:
            token, claims = issue_token(
                ring,
                settings.security,
                subject=args.subject,
                role=role,
                sites=["*"] if sites is None else sites,
                ttl=ttl,
            )
        except AuthError as exc:
            return _fail(str(exc))
        audit.record_cli(
            conn,
            "tokens.issue",
            target=claims["jti"],
            detail={
                "subject": claims["sub"],
                "role": role,
                "sites": claims["sites"],
                "expires": datetime.fromtimestamp(claims["exp"], UTC).isoformat(),
                "key_id": ring.current_id,
            },
        )
    print(token)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with command_connection(settings.database) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO ops.revoked_tokens(jti, reason) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (args.jti, args.reason),
        )
        audit.record_cli(
            conn,
            "tokens.revoke",
            target=args.jti,
            detail={"reason": args.reason},
        )
    print(f"revoked token {args.jti}")
    return 0


def cmd_tokens_rotate_key(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with command_connection(settings.database) as conn, conn.transaction():
        kid = generate_token_key(settings.keys_dir)
        audit.record_cli(conn, "tokens.rotate_key", target=kid)
    print(
        f"new token signing key {kid} in {settings.keys_dir}; older keys keep verifying "
        "until revoked "
        "(`cloud-api tokens revoke-key KID`) or their files are removed"
    )
    return 0


def cmd_tokens_revoke_key(args: argparse.Namespace) -> int:
    """Refuse every token signed by a key, on every API process, and delete its files here."""
    settings = _settings(args)
    directory = settings.keys_dir
    ring = TokenKeyring.load(directory) if directory.is_dir() else TokenKeyring({}, None)
    if args.kid == ring.current_id:
        return _fail(
            f"{args.kid} is the current signing key: run `cloud-api tokens rotate-key` first"
        )
    with command_connection(settings.database) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO ops.revoked_token_keys(kid, reason) VALUES (%s, %s) "
            "ON CONFLICT DO NOTHING",
            (args.kid, args.reason),
        )
        audit.record_cli(conn, "tokens.revoke_key", target=args.kid, detail={"reason": args.reason})
    # After the commit: API processes refuse the key from the database, whichever key files
    # their hosts still hold; the files here go so nothing can sign with it again.
    for name in (f"jwt-{args.kid}.key", f"jwt-{args.kid}.pub"):
        (directory / name).unlink(missing_ok=True)
    print(
        f"revoked token signing key {args.kid}; every API process refuses its tokens within "
        f"{2 * settings.security.revocation_refresh_seconds:g} s"
    )
    return 0


def cmd_pii_rotate_key(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with command_connection(settings.database) as conn, conn.transaction():
        kid = generate_pii_key(settings.keys_dir)
        audit.record_cli(conn, "pii.rotate_key", target=kid)
    print(f"new personal-data key {kid}; keep the older keys to read what they sealed")
    return 0


def cmd_apikeys_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        role = parse_role(args.role)
        sites = parse_sites(_csv(args.sites))
        scopes = _csv(args.scopes)
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be among {', '.join(SCOPES)}")
        expires = datetime.now(UTC) + parse_duration(args.expires) if args.expires else None
    except ValueError as exc:
        return _fail(str(exc))
    key, prefix, secret_hash = new_api_key()
    with command_connection(settings.database) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO ops.api_keys(prefix, secret_hash, name, role, scopes, sites, created_by, "
            "expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                prefix,
                secret_hash,
                args.name,
                role,
                scopes,
                ["*"] if sites is None else list(sites),
                audit.cli_actor(),
                expires,
            ),
        )
        audit.record_cli(
            conn,
            "apikeys.create",
            target=prefix,
            detail={
                "name": args.name,
                "role": role,
                "scopes": scopes,
                "sites": ["*"] if sites is None else list(sites),
                "expires": expires.isoformat() if expires else None,
            },
        )
    print(f"# API key {prefix} ({args.name}); shown only now, store it safely", file=sys.stderr)
    print(key)
    return 0


def cmd_apikeys_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with command_connection(settings.database) as conn, conn.transaction():
        row = conn.execute(
            "UPDATE ops.api_keys SET revoked_at = now() WHERE prefix = %s AND revoked_at IS NULL "
            "RETURNING name",
            (args.prefix,),
        ).fetchone()
        if row is None:
            return _fail(f"no active API key with prefix {args.prefix!r}")
        audit.record_cli(
            conn,
            "apikeys.revoke",
            target=args.prefix,
            detail={"name": row[0]},
        )
    print(f"revoked API key {args.prefix}")
    return 0


def cmd_apikeys_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with command_connection(settings.database) as conn:
        rows = conn.execute(
            "SELECT prefix, name, role, scopes, sites, created_at, expires_at, revoked_at, "
            "last_used_at FROM ops.api_keys ORDER BY created_at"
        ).fetchall()
    for r in rows:
        state = "revoked" if r[7] else "expired" if r[6] and r[6] <= datetime.now(UTC) else "active"
        print(
            f"{r[0]}  {state:<7}  {r[2]:<8}  scopes={','.join(r[3])}  sites={','.join(r[4])}  "
            f"expires={r[6].isoformat() if r[6] else 'never'}  "
            f"last_used={r[8].isoformat() if r[8] else 'never'}  {r[1]}"
        )
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with command_connection(settings.database) as conn:
        rows = conn.execute(
            "SELECT id, at, actor, actor_kind, action, target, site_id, detail, trace_id "
            "FROM audit.records WHERE (%(trace)s::text IS NULL OR trace_id = %(trace)s) "
            "ORDER BY id DESC LIMIT %(limit)s",
            {"trace": args.trace_id, "limit": args.limit},
        ).fetchall()
    for r in reversed(rows):
        record: dict[str, Any] = {
            "id": r[0],
            "at": r[1].isoformat(),
            "actor": r[2],
            "actor_kind": r[3],
            "action": r[4],
            "target": r[5],
            "site": r[6],
            "detail": r[7],
            "trace_id": r[8],
        }
        print(json.dumps(record, separators=(",", ":")))
    return 0


def register(sub: Any) -> None:
    """Add the `tokens`, `apikeys`, `pii` and `audit` command groups to the `cloud-api` parser."""
    tokens = sub.add_parser("tokens", help="bearer tokens").add_subparsers(
        dest="tokens", required=True
    )
    p = tokens.add_parser("issue", help="sign a bearer token; prints it once")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--sites", required=True, help="comma-separated site ids, or '*'")
    p.add_argument("--ttl", default="30d", help="lifetime, e.g. 30d, 12h (default 30d)")
    p.add_argument("--subject", default="cli-issued", help="who the token is for")
    p.set_defaults(func=cmd_tokens_issue)
    p = tokens.add_parser("revoke", help="refuse a token before it expires (by its jti)")
    p.add_argument("jti")
    p.add_argument("--reason", default="")
    p.set_defaults(func=cmd_tokens_revoke)
    tokens.add_parser(
        "rotate-key", help="new current signing key (old keys keep verifying)"
    ).set_defaults(func=cmd_tokens_rotate_key)
    p = tokens.add_parser(
        "revoke-key", help="refuse every token signed by a key (not the current one)"
    )
    p.add_argument("kid", help="the key id (a token's `kid` header, the jwt-<kid>.key name)")
    p.add_argument("--reason", default="")
    p.set_defaults(func=cmd_tokens_revoke_key)

    keys = sub.add_parser("apikeys", help="service API keys").add_subparsers(
        dest="apikeys", required=True
    )
    p = keys.add_parser("create", help="create a key; prints it once")
    p.add_argument("--name", required=True)
    p.add_argument("--role", default="service", choices=ROLES)
    p.add_argument("--scopes", default="read", help=f"comma-separated: {', '.join(SCOPES)}")
    p.add_argument("--sites", required=True, help="comma-separated site ids, or '*'")
    p.add_argument("--expires", help="lifetime, e.g. 90d (default: no expiry)")
    p.set_defaults(func=cmd_apikeys_create)
    p = keys.add_parser("revoke", help="revoke a key by its prefix")
    p.add_argument("prefix")
    p.set_defaults(func=cmd_apikeys_revoke)
    keys.add_parser("list", help="keys with state, scopes and sites").set_defaults(
        func=cmd_apikeys_list
    )

    pii = sub.add_parser("pii", help="personal-data keys").add_subparsers(dest="pii", required=True)
    pii.add_parser("rotate-key", help="new current AES-256-GCM key").set_defaults(
        func=cmd_pii_rotate_key
    )

    audit_cmd = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit", required=True
    )
    p = audit_cmd.add_parser("list", help="latest audit records as JSON lines")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--trace-id")
    p.set_defaults(func=cmd_audit_list)
