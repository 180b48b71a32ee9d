"""`edge-agent browse opc.tcp://HOST:PORT [--path ...]`: print an OPC UA server's address space."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def cmd_browse(args: argparse.Namespace) -> int:
    from connectors.opcua.browse import browse  # asyncua loads only for this command

    try:
        namespaces, rows = asyncio.run(
            browse(
                args.url,
                args.path,
                depth=args.depth,
                max_nodes=args.max_nodes,
                request_timeout=args.timeout,
                username=args.username,
                password=args.password or os.environ.get("OPCUA_PASSWORD"),
            )
        )
    except Exception as exc:  # the command reports any failure in one line
        print(f"edge-agent: browse {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
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
    p = sub.add_parser("browse", help="print an OPC UA server's nodes, types and values")
    p.add_argument("url", help="opc.tcp://HOST:PORT")
    p.add_argument("--path", help="start here: a node id or browse path (default /Objects)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-nodes", type=int, default=5000)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--username")
    p.add_argument("--password", help="better: leave out and set OPCUA_PASSWORD")
    p.set_defaults(func=cmd_browse)
