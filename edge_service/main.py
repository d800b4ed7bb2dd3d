"""Build and run the edge app: ``create_app`` for tests and servers, ``run`` for the
``fedinspect edge`` command (uvicorn, settings from the environment)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fl_core
from edge_service.api.deps import get_settings
from edge_service.api.main import api_router
from edge_service.config import Settings
from edge_service.services.context import build_context
from fedinspect.pages import install_pages
from fl_core.errors import AuthError, FedInspectError

log = logging.getLogger("edge_service")

STATIC_DIR = Path(__file__).parent / "static" / "ui"


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` on ``paths`` with 413, before they are
    spooled to disk: by Content-Length when sent, else by counting the stream."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: frozenset[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"request body too large: the limit is {self.max_bytes} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        received = 0
        exceeded = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # once over the limit, whatever the app makes of the cut body is dropped
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await self._refuse(send)


async def _fedinspect_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FedInspectError)
    headers = {"WWW-Authenticate": "Bearer"} if type(exc) is AuthError else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.http_status, headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    # One string, like every other error of the API (ErrorResponse), not FastAPI's list.
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)


def create_app(
    settings: Settings | None = None, server_client: httpx.Client | None = None
) -> FastAPI:
    """The edge app. ``server_client`` replaces the HTTP client to the server (tests
    pass a MockTransport client or the server's TestClient); by default one is built
    from settings and closed with the app."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = build_context(settings, server_client)
        app.state.ctx = ctx
        log.info(
            "event=started edge=%s server=%s dataset=%s",
            settings.name,
            settings.server_url,
            settings.dataset,
        )
        await asyncio.to_thread(ctx.log_readiness)
        try:
            yield
        finally:
            ctx.close()

    app = FastAPI(
        title="FedInspect edge",
        version=fl_core.__version__,
        description="Edge agent of FedInspect: joins training cycles by uploading features "
        "of local images (never the images), fine-tunes and gates the resulting model on "
        "local data, and serves predictions with Grad-CAM heat maps.",
        lifespan=lifespan,
        docs_url=None,  # served offline by install_pages
        redoc_url=None,
    )
    app.dependency_overrides[get_settings] = lambda: settings
    app.add_exception_handler(FedInspectError, _fedinspect_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_predict_bytes, paths=frozenset({"/v1/predict"})
    )
    app.include_router(api_router)
    install_pages(app, STATIC_DIR)
    return app


def apply_threads(settings: Settings) -> None:
    """Size this process's PyTorch thread pool (ONNX Runtime sessions follow it)."""
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)


def run(settings: Settings | None = None) -> None:
    """Serve the edge with uvicorn (``fedinspect edge``)."""
    import uvicorn

    if settings is None:
        try:
            settings = Settings()  # type: ignore[call-arg]  # admin_token from the environment
        except ValidationError as exc:
            problems = "; ".join(
                f"FEDINSPECT_EDGE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                for e in exc.errors()
            )
            sys.exit(f"edge settings are invalid: {problems}")
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    apply_threads(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )


__all__ = ["BodySizeLimit", "apply_threads", "create_app", "run"]
