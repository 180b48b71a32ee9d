"""The `/v1` read routes (APIRouters) and their installation into the FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI

from cloud_api.api.cache import ResultCache
from cloud_api.api.routes import analytics, fleet, kpis, live

__all__ = ["install_routes"]


def install_routes(app: FastAPI, *, cache_entries: int = 10_000) -> None:
    """Include the read routers and give the app its result cache."""
    app.state.result_cache = ResultCache(cache_entries)
    app.include_router(analytics.router)
    app.include_router(fleet.router)
    app.include_router(kpis.router)
    app.include_router(live.router)
