"""The API as an app factory for uvicorn worker processes (`cloud-api serve` with
`http.workers` > 1, or `uvicorn cloud_api.asgi:app --factory`).

Settings come from the file named by CLOUD_CONFIG (if set) and the CLOUD_* environment.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from cloud_api.api.app import create_app
from cloud_api.config import load_settings


def app() -> FastAPI:
    return create_app(load_settings(os.environ.get("CLOUD_CONFIG") or None))
