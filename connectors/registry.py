"""The connector registry: a connection's `type:` -> its config model and its hub factory.

The config dataclasses are imported eagerly (they import no library); the hubs only when one
is built, so loading a configuration does not import asyncua or pymodbus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from common.checks import Check
from connectors.connector import EquipmentSource, Hub
from connectors.modbus.config import ModbusConnection, ModbusRtuConnection
from connectors.opcua.config import OpcUaConnection

Connection = Annotated[
    ModbusConnection | ModbusRtuConnection | OpcUaConnection, Check(discriminator="type")
]


def _modbus(connection: Any, equipment: Sequence[EquipmentSource]) -> Hub:
    from connectors.modbus.hub import ModbusHub, modbus_tags

    return ModbusHub(connection, modbus_tags(connection.id, equipment))


def _opcua(connection: Any, equipment: Sequence[EquipmentSource]) -> Hub:
    from connectors.opcua.hub import OpcUaHub, opcua_tags

    return OpcUaHub(connection, opcua_tags(connection.id, equipment))


@dataclass(frozen=True)
class ConnectorType:
    config_model: type
    build: Callable[[Any, Sequence[EquipmentSource]], Hub]
    # which field of a signal says where it is read on this kind of connection
    signal_field: str


CONNECTOR_TYPES: dict[str, ConnectorType] = {
    "modbus": ConnectorType(ModbusConnection, _modbus, "address"),
    "modbus-rtu": ConnectorType(ModbusRtuConnection, _modbus, "address"),
    "opcua": ConnectorType(OpcUaConnection, _opcua, "node"),
}


def build_hub(
    connection: ModbusConnection | ModbusRtuConnection | OpcUaConnection,
    equipment: Sequence[EquipmentSource],
) -> Hub:
    """The hub for one configured connection, serving the equipment attached to it."""
    return CONNECTOR_TYPES[connection.type].build(connection, equipment)
