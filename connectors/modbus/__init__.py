"""Modbus TCP/RTU connector: config, hub, codec."""
