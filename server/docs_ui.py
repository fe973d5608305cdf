"""/docs without the internet: Swagger UI's assets come from the swagger-ui-bundle package, not a CDN.

GPU nodes are often air-gapped, and FastAPI's built-in /docs page loads its JavaScript and CSS from a CDN
(and /redoc likewise), so both built-in pages are switched off and this one is served instead.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def add_offline_docs(app: FastAPI) -> None:
    """Serve the Swagger UI page at /docs and its assets under /docs/assets (create the app with docs_url=None)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            # Swagger UI otherwise shows a badge fetched from the public online validator.
            swagger_ui_parameters={"validatorUrl": None})
