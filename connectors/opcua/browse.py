"""Walking an OPC UA server's address space, for `edge-agent browse`: node ids, browse names,
data types and current values, so a plant engineer can write the `node:` of each signal."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node

from connectors.opcua.hub import plain_value, resolve_node


@dataclass(frozen=True)
class BrowseRow:
    depth: int
    node_id: str
    namespace_id: str  # the same node as nsu=URI;..., which survives renumbered namespaces
    browse_name: str
    node_class: str
    data_type: str | None
    value: str | None


def _nsu(node_id: ua.NodeId, namespaces: list[str]) -> str:
    text = node_id.to_string()
    if node_id.NamespaceIndex == 0 or node_id.NamespaceIndex >= len(namespaces):
        return text
    rest = text.split(";", 1)[1]
    return f"nsu={namespaces[node_id.NamespaceIndex]};{rest}"


async def browse(
    url: str,
    path: str | None = None,
    *,
    depth: int = 4,
    max_nodes: int = 5000,
    request_timeout: float = 5.0,
    username: str | None = None,
    password: str | None = None,
) -> tuple[list[str], list[BrowseRow]]:
    """(namespace table, rows) below `path` (a node id or browse path; default /Objects).

    Standard nodes (namespace 0) are listed but not descended into, except at the start,
    so the server's own diagnostics do not drown the machine's variables."""
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    client = Client(url, timeout=request_timeout)
    if username is not None:
        client.set_user(username)
        client.set_password(password or "")
    async with asyncio.timeout(request_timeout * 3):
        await client.connect()
    try:
        namespaces = list(await client.get_namespace_array())
        start: Node = client.nodes.objects
        if path:
            start = client.get_node(await resolve_node(client, path, namespaces))
        rows: list[BrowseRow] = []

        async def visit(node: Node, level: int) -> None:
            if len(rows) >= max_nodes:
                return
            refs = await node.get_children_descriptions()
            for ref in refs:
                if len(rows) >= max_nodes:
                    return
                child = client.get_node(ref.NodeId)
                data_type: str | None = None
                value: str | None = None
                if ref.NodeClass == ua.NodeClass.Variable:
                    dv = await child.read_data_value(raise_on_bad_status=False)
                    try:
                        dt_node = client.get_node(await child.read_data_type())
                        data_type = str((await dt_node.read_browse_name()).Name)
                    except Exception:  # a broken data type reference must not end the walk
                        data_type = "?"
                    status = dv.StatusCode or ua.StatusCode()
                    if not status.is_good():
                        value = status.name
                    else:
                        try:
                            value = repr(plain_value(dv.Value.Value if dv.Value else None))
                        except ValueError:
                            value = f"<{type(dv.Value.Value).__name__}>" if dv.Value else None
                name = ref.BrowseName
                rows.append(
                    BrowseRow(
                        level,
                        ref.NodeId.to_string(),
                        _nsu(ref.NodeId, namespaces),
                        f"{name.NamespaceIndex}:{name.Name}",
                        ref.NodeClass.name,
                        data_type,
                        value,
                    )
                )
                if level + 1 < depth and (ref.NodeId.NamespaceIndex != 0 or (level == 0 and path)):
                    await visit(child, level + 1)

        await visit(start, 0)
        return namespaces, rows
    finally:
        try:
            async with asyncio.timeout(2.0):
                await client.disconnect()
        except Exception:  # the walk's result matters more than a clean goodbye
            client.uaclient.disconnect_socket()
