"""The API app factory the benchmark serves with uvicorn workers (settings from CLOUD_*)."""

from __future__ import annotations

from fastapi import FastAPI

from cloud_api.app import create_app
from cloud_api.config import load_settings


def app() -> FastAPI:
    return create_app(load_settings())
