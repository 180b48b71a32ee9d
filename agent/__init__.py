"""The edge service: configuration, runtime wiring, CLI, health and metrics."""
