"""`edge-agent browse [URL] [-c FILE [--connection ID]] [--path ...]`: print an OPC UA server's
address space, over the same secure session the agent would open."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from typing import get_args

from agent.config import ConfigError, load_config
from common.checks import validate
from connectors.opcua.config import OpcUaConnection, SecurityMode, SecurityPolicy

_SECURITY_FLAGS = (
    "security_policy",
    "security_mode",
    "certificate",
    "private_key",
    "server_certificate",
    "username",
)


def _connection(args: argparse.Namespace) -> OpcUaConnection:
    """The connection to browse: from the configuration file, from the flags, or both (the
    flags win)."""
    data: dict[str, object] = {"id": "browse"}
    if args.config:
        found = [
            c
            for c in load_config(args.config).connections
            if isinstance(c, OpcUaConnection) and args.connection in (None, c.id)
        ]
        if len(found) != 1:
            which = f"an OPC UA connection {args.connection!r}" if args.connection else None
            raise ConfigError(
                f"{args.config}: has no {which or 'OPC UA connection'}"
                if not found
                else f"{args.config}: has several OPC UA connections; name one with --connection"
            )
        data = dataclasses.asdict(found[0])
    elif args.connection:
        raise ConfigError("--connection needs -c FILE")
    if args.url:
        data["url"] = args.url
    if "url" not in data:
        raise ConfigError("give the server's URL (opc.tcp://HOST:PORT) or -c FILE")
    if args.timeout is not None:
        data["timeout"] = args.timeout
    data.update({k: getattr(args, k) for k in _SECURITY_FLAGS if getattr(args, k) is not None})
    if args.password is not None:
        data["password"] = args.password
    elif "username" in data and "password" not in data and "OPCUA_PASSWORD" in os.environ:
        data["password"] = os.environ["OPCUA_PASSWORD"]
    try:
        return validate(OpcUaConnection, data)
    except ValueError as exc:
        raise ConfigError(f"browse: {exc}") from None


def cmd_browse(args: argparse.Namespace) -> int:
    from connectors.opcua.browse import browse  # asyncua loads only for this command

    connection = _connection(args)
    try:
        namespaces, rows = asyncio.run(
            browse(connection, args.path, depth=args.depth, max_nodes=args.max_nodes)
        )
    except Exception as exc:  # the command reports any failure in one line
        error = str(exc) or type(exc).__name__
        print(f"edge-agent: browse {connection.url}: {error}", file=sys.stderr)
        return 1
    print("namespaces:")
    for i, uri in enumerate(namespaces):
        print(f"  ns={i}  {uri}")
    print()
    for row in rows:
        indent = "  " * row.depth
        line = f"{indent}{row.browse_name:<28} {row.node_class:<8} {row.node_id}"
        if row.node_class == "Variable":
            line += f"  [{row.data_type}] = {row.value}"
            if row.namespace_id != row.node_id:
                line += f"\n{indent}{'':<28} {'':<8} {row.namespace_id}"
        print(line)
    if len(rows) >= args.max_nodes:
        print(f"... stopped after {args.max_nodes} nodes (--max-nodes)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "browse",
        help="print an OPC UA server's nodes, types and values",
        description="Open the server as a connection of the agent would (-c FILE, with its "
        "security and user) or as the flags say, and print its address space.",
    )
    p.add_argument("url", nargs="?", help="opc.tcp://HOST:PORT (default: the connection's)")
    p.add_argument("-c", "--config", help="take the connection from this agent configuration")
    p.add_argument("--connection", help="the id of the OPC UA connection in -c FILE")
    p.add_argument("--path", help="start here: a node id or browse path (default /Objects)")
    p.add_argument("--depth", type=int, default=4, help="levels below the start (default 4)")
    p.add_argument(
        "--max-nodes", type=int, default=5000, help="stop after this many nodes (default 5000)"
    )
    p.add_argument("--timeout", help="per request, e.g. 5s (default: the connection's, 5s)")
    p.add_argument(
        "--security-policy", choices=get_args(SecurityPolicy), help="default: the connection's"
    )
    p.add_argument(
        "--security-mode", choices=get_args(SecurityMode), help="default: the connection's"
    )
    p.add_argument("--certificate", help="client certificate (edge-agent keys opcua-cert)")
    p.add_argument("--private-key", help="its private key")
    p.add_argument("--server-certificate", help="trust only this server certificate")
    p.add_argument("--username", help="user name (default: the connection's, or anonymous)")
    p.add_argument("--password", help="better: leave out and set OPCUA_PASSWORD")
    p.set_defaults(func=cmd_browse)
