"""The dashboard: one static page served at `/` with its CSS, script and vendored Chart.js;
and the interactive API documentation at `/docs` (vendored Swagger UI).

The page is a client of the public /v1 API like any other (same bearer token, entered once
and kept for the tab, or for the screen in kiosk mode), so it shows exactly what the API
returns; its live view polls `/v1/plant/live` with ETags. Everything is
served from the package: no CDN, no inline script or style, so a strict Content-Security-Policy
(`default-src 'self'`) holds.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent.parent / "static"


def install_dashboard(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/static/`."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        # The page is small and changes with each release: always revalidate.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> FileResponse:
        # Interactive docs (Swagger UI, vendored) for /openapi.json, under the same CSP.
        return FileResponse(STATIC_DIR / "docs.html", headers={"Cache-Control": "no-cache"})
