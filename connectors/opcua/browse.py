"""Walking an OPC UA server's address space, for `edge-agent browse`: node ids, browse names,
data types and current values, so a plant engineer can write the `node:` of each signal."""

from __future__ import annotations

from dataclasses import dataclass

from asyncua import ua
from asyncua.common.node import Node

from common.checks import validated
from connectors.opcua.config import OpcUaConnection
from connectors.opcua.hub import OpcUaHub, plain_value, resolve_node


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
    connection: OpcUaConnection | str,
    path: str | None = None,
    *,
    depth: int = 4,
    max_nodes: int = 5000,
) -> tuple[list[str], list[BrowseRow]]:
    """(namespace table, rows) below `path` (a node id or browse path; default /Objects).

    `connection` is a configured connection (security, user, timeout: the session is the
    one the hub opens) or a URL (anonymous, without security). Standard nodes (namespace
    0) are listed but not descended into, except at the start, so the server's own
    diagnostics do not drown the machine's variables."""
    if isinstance(connection, str):
        connection = validated(OpcUaConnection, id="browse", url=connection)
    async with OpcUaHub(connection, []) as hub:
        client = await hub.connect()
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
