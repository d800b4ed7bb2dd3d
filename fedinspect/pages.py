"""Operator pages of both services, served from the package with nothing loaded from
another host (factory networks are often offline).

- ``/docs`` (Swagger UI) and ``/redoc``: their JavaScript and CSS come from the
  ``fastapi-offline`` package (Swagger UI and ReDoc bundled, with their licenses),
  served under ``/docs-assets``; ``Authorize`` keeps the token in the page only.
- ``/ui``: a service's own page (dashboard of the server, page of an edge): static
  HTML, CSS and JavaScript from the service's ``static/ui`` folder, no build step.

The pages hold no data: the data comes from the API, which needs a token. So the pages
themselves are public, like ``/openapi.json`` (SECURITY.md), and every answer carries a
Content-Security-Policy that lets the page talk to, and load from, its own origin only.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCS_ASSETS = "/docs-assets"
UI_ASSETS = "/ui/assets"
#: the script and style sheet both services' pages share
UI_COMMON = "/ui/common"
COMMON_DIR = Path(__file__).parent / "static" / "ui"

#: the service's own page: no inline script or style, nothing from another host
UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
#: Swagger UI and ReDoc start from an inline script (FastAPI's page) and style inline;
#: still nothing from another host
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

_PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _docs_assets() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


class _Headers:
    """Adds fixed headers to every answer under a path prefix (static files too)."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.raw]
            await send(message)

        await self.app(scope, receive, with_headers)


def install_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` and ReDoc at ``/redoc``, from the package's assets.

    ``app`` must be created with ``docs_url=None, redoc_url=None``.
    """
    headers = {**_PAGE_HEADERS, "Content-Security-Policy": DOCS_CSP}
    app.mount(
        DOCS_ASSETS,
        _Headers(StaticFiles(directory=_docs_assets()), {"X-Content-Type-Options": "nosniff"}),
        name="docs-assets",
    )
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title}: Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            # no validator badge (it would ask a public host); the token stays in the
            # page (persistAuthorization would write it to localStorage)
            swagger_ui_parameters={
                "validatorUrl": None,
                "persistAuthorization": False,
                "tryItOutEnabled": True,
            },
        )
        page.headers.update(headers)
        return page

    @app.get(redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        page = get_swagger_ui_oauth2_redirect_html()
        page.headers.update(headers)
        return page

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title}: ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(headers)
        return page


def install_ui(app: FastAPI, static_dir: Path) -> None:
    """The service's page at ``/ui`` (``index.html``), its assets under ``/ui/assets``,
    the shared ones under ``/ui/common``, and ``/`` redirecting to it."""
    index = static_dir / "index.html"
    headers = {**_PAGE_HEADERS, "Content-Security-Policy": UI_CSP}
    asset_headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    app.mount(
        UI_COMMON,
        _Headers(StaticFiles(directory=COMMON_DIR), asset_headers),
        name="ui-common",
    )
    app.mount(
        UI_ASSETS, _Headers(StaticFiles(directory=static_dir), asset_headers), name="ui-assets"
    )

    @app.get("/ui", include_in_schema=False)
    def ui() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers=headers)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")


def install_pages(app: FastAPI, static_dir: Path) -> None:
    """Swagger UI, ReDoc and the service's page (see the module's docstring)."""
    install_docs(app)
    install_ui(app, static_dir)


__all__ = ["DOCS_CSP", "UI_CSP", "install_docs", "install_pages", "install_ui"]
