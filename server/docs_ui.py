"""/docs without the internet: Swagger UI 5's assets come from the fastapi-offline package, not a CDN.

GPU nodes are often air-gapped, and FastAPI's built-in /docs page loads its JavaScript and CSS from a CDN
(and /redoc likewise), so both built-in pages are switched off and this one is served instead. FastAPI writes
OpenAPI 3.1, which Swagger UI reads from version 5 on (4.x answers "Unable to render this definition");
fastapi-offline ships Swagger UI 5 and needs nothing but FastAPI. Only its static files are used here.
"""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
SWAGGER_UI_DIR = files("fastapi_offline") / "static"  # swagger-ui-bundle.js, swagger-ui.css, favicon.png


def add_offline_docs(app: FastAPI) -> None:
    """Serve the Swagger UI page at /docs and its assets under /docs/assets (create the app with docs_url=None)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=str(SWAGGER_UI_DIR)), name="swagger-ui-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            # Swagger UI otherwise shows a badge fetched from the public online validator.
            swagger_ui_parameters={"validatorUrl": None})
