"""Compacted nodes read, browse and update exactly as the nodes asyncua built, while equal
attributes and references are one object shared between the equipment."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

from agent.floor.aspace import ensure_shelf, init_server
from agent.floor.nodes import CompactNode, Interner, compact, make_properties_virtual

NS = "urn:test:compact"


async def _equipment(server: Server, ns: int, parent: Any, eq: str) -> list[ua.NodeId]:
    obj = await parent.add_object(ua.NodeId(eq, ns), ua.QualifiedName(eq, ns))
    folder = await obj.add_folder(ua.NodeId(f"{eq}.Shift", ns), ua.QualifiedName("Shift", ns))
    var = await folder.add_variable(
        ua.NodeId(f"{eq}.Shift.OEE", ns),
        ua.QualifiedName("OEE", ns),
        ua.Variant(None, ua.VariantType.Null),
        datatype=ua.NodeId(ObjectIds.Double),
    )
    await var.write_attribute(
        AttributeIds.Description, ua.DataValue(ua.Variant(ua.LocalizedText("OEE of the shift")))
    )
    unit = ua.EUInformation(
        NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
        UnitId=4403250,
        DisplayName=ua.LocalizedText("1"),
        Description=ua.LocalizedText("one"),
    )
    prop = await var.add_property(
        ua.NodeId(f"{eq}.Shift.OEE.EngineeringUnits", ns),
        ua.QualifiedName("EngineeringUnits", 0),
        unit,
        datatype=ua.NodeId(ObjectIds.EUInformation),
    )
    return [obj.nodeid, folder.nodeid, var.nodeid, prop.nodeid]


def _seen(server: Server, nodeids: list[ua.NodeId]) -> dict[str, Any]:
    """Everything a client can read or browse of the nodes."""
    aspace = server.iserver.aspace
    seen: dict[str, Any] = {}
    for nodeid in nodeids:
        for attr in AttributeIds:
            seen[f"{nodeid.to_string()} {attr.name}"] = aspace.read_attribute_value(nodeid, attr)
        browse = ua.BrowseDescription(
            NodeId=nodeid,
            BrowseDirection=ua.BrowseDirection.Both,
            ReferenceTypeId=ua.NodeId(ObjectIds.References),
            IncludeSubtypes=True,
            ResultMask=63,
        )
        result = server.iserver.view_service.browse(ua.BrowseParameters(NodesToBrowse=[browse]))
        seen[f"{nodeid.to_string()} browse"] = result
    return seen


async def test_compacted_nodes_are_what_asyncua_built_and_share_what_is_equal(
    tmp_path: Path,
) -> None:
    shelf = await ensure_shelf(tmp_path)
    server = Server()
    await init_server(server, shelf)
    ns = await server.register_namespace(NS)
    plant = await server.nodes.objects.add_folder(ua.NodeId("Plant", ns), "Plant")
    made = [plant.nodeid]
    for eq in ("press-1", "press-2"):
        made += await _equipment(server, ns, plant, eq)
    before = _seen(server, made)

    compact(server.iserver.aspace, made, Interner())
    # The second engineering unit leaves the table, to be made from the first when asked for.
    assert make_properties_virtual(server.iserver.aspace, made) == 1
    cache = server.iserver.aspace._nodes.cache  # type: ignore[attr-defined]
    assert made[4] in cache and made[8] not in cache

    aspace = server.iserver.aspace
    assert made[8] in aspace  # asked for: made again
    assert all(isinstance(aspace[n], CompactNode) for n in made)
    assert made[8] in cache
    missing = ua.NodeId("press-1.Shift.EngineeringUnits", made[8].NamespaceIndex)
    assert missing not in aspace  # the folder has no unit: nothing is made for it
    after = _seen(server, made)
    assert after.keys() == before.keys()
    for key, was in before.items():
        now, then = after[key], was
        if key.endswith("EngineeringUnits Value"):
            # The unit is one value object for all: the timestamps of the first property.
            now = dataclasses.replace(now, SourceTimestamp=None, ServerTimestamp=None)
            then = dataclasses.replace(then, SourceTimestamp=None, ServerTimestamp=None)
        assert now == then, key
    one, two = aspace[made[3]], aspace[made[7]]  # the two OEE variables
    for attr in (AttributeIds.DataType, AttributeIds.Description, AttributeIds.BrowseName):
        assert one.attributes[attr] is two.attributes[attr]
    assert one.attributes[AttributeIds.Value] is not two.attributes[AttributeIds.Value]
    units = [aspace[made[4]], aspace[made[8]]]  # their engineering units, one object
    assert units[0].attributes[AttributeIds.Value] is units[1].attributes[AttributeIds.Value]

    # Values stay each node's own: writing one changes only it, and its subscribers hear it.
    heard: list[Any] = []

    async def listener(handle: int, value: ua.DataValue) -> None:
        heard.append((handle, value.Value))

    status, handle = aspace.add_datachange_callback(made[3], AttributeIds.Value, listener)
    assert status.is_good()
    await server.write_attribute_value(made[3], ua.DataValue(ua.Variant(0.85)))
    assert aspace.read_attribute_value(made[3], AttributeIds.Value).Value == ua.Variant(0.85)
    assert aspace.read_attribute_value(made[7], AttributeIds.Value).Value == ua.Variant(None)
    assert heard == [(handle, ua.Variant(0.85))]
    aspace.delete_datachange_callback(handle)
    await server.write_attribute_value(made[3], ua.DataValue(ua.Variant(0.9)))
    assert len(heard) == 1  # the subscription ended
    # A value nobody subscribed to never got a dict of callbacks.
    assert aspace[made[7]].attributes[AttributeIds.Value].callbacks is None  # type: ignore[attr-defined]
    await server.write_attribute_value(made[3], ua.DataValue(ua.Variant(0.85)))
    # A value of the wrong type is refused as before.
    await server.write_attribute_value(made[3], ua.DataValue(ua.Variant("text")))
    assert aspace.read_attribute_value(made[3], AttributeIds.Value).Value == ua.Variant(0.85)
