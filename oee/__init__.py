"""The OEE domain: events, the ISO 22400 time model, counters, shifts and formulas (no I/O)."""

from oee.components import COMPONENT_FIELDS, Components, Ratios, ratios

__all__ = ["COMPONENT_FIELDS", "Components", "Ratios", "ratios"]
