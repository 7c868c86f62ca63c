"""The playground page at ``/``: plain HTML, CSS and JavaScript from ``static/`` (no build step, no
file from elsewhere; a Content-Security-Policy of ``'self'`` holds the page to this server).

The page itself needs no key (it holds no data); its requests send the key the user enters.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
SECURITY_HEADERS = {
    # Only this server: no CDN, font or script from elsewhere can load or be reached.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def mount_playground(app: FastAPI) -> None:
    """``GET /`` (the page) and ``GET /static/...`` (its scripts and style)."""

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
