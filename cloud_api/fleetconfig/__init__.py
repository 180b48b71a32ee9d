"""Remote configuration of agents: versions in PostgreSQL, signed and published to each agent."""

from __future__ import annotations

from fastapi import FastAPI

from cloud_api.config import CloudSettings

__all__ = ["install"]


def install(app: FastAPI, settings: CloudSettings) -> None:
    """Include the configuration routes; they publish with the app's MQTT settings and keys."""
    from cloud_api.fleetconfig.routes import router

    app.state.fleetconfig_settings = settings
    app.include_router(router)
