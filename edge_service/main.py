"""Build and run the edge app: ``create_app`` for tests and servers, ``run`` for the
``fedinspect edge`` command (uvicorn, settings from the environment)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

import fl_core
from edge_service.api.deps import check_admin, get_settings, require_admin
from edge_service.api.main import api_router
from edge_service.config import Settings
from edge_service.services.context import build_context
from fedinspect.pages import install_pages
from fl_core.errors import AuthError, FedInspectError
from fl_core.guards import (
    AdmissionControl,
    RequestGuard,
    Scope,
    install_access_log_filter,
    redact_url,
    route_needs,
    shorten,
)

#: an error detail never repeats more of the caller's input than this
MAX_DETAIL_CHARS = 1000

log = logging.getLogger("edge_service")

STATIC_DIR = Path(__file__).parent / "static" / "ui"


async def _fedinspect_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FedInspectError)
    headers = {"WWW-Authenticate": "Bearer"} if type(exc) is AuthError else None
    return JSONResponse(
        {"detail": shorten(exc.detail, MAX_DETAIL_CHARS)},
        status_code=exc.http_status,
        headers=headers,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    # One string, like every other error of the API (ErrorResponse), not FastAPI's list.
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(shorten(str(part)) for part in err.get("loc", ()))
        problems.append(f"{where}: {shorten(str(err.get('msg', 'invalid')))}")
    detail = shorten("; ".join(problems) or "invalid request", MAX_DETAIL_CHARS)
    return JSONResponse({"detail": detail}, status_code=422)


def _authenticate(settings: Settings) -> Callable[[Scope, str | None], Awaitable[str]]:
    async def authenticate(_scope: Scope, token: str | None) -> str:
        check_admin(settings, token)
        return "admin"

    return authenticate


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
            redact_url(settings.server_url),
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
    predict = ("POST", "/v1/predict")
    app.add_middleware(
        AdmissionControl,
        max_requests=settings.max_concurrent_requests,
        max_uploads=settings.max_concurrent_predictions,
        wait_s=settings.admission_wait_s,
        is_upload=lambda scope: (scope["method"], scope["path"]) == predict,
    )
    # Outermost: 401 before a byte of the body is read, size and rate limits on bodies.
    app.add_middleware(
        RequestGuard,
        needs_auth=route_needs(require_admin),
        authenticate=_authenticate(settings),
        body_limit=lambda scope: (
            settings.max_predict_bytes
            if (scope["method"], scope["path"]) == predict
            else settings.max_request_bytes
        ),
        idle_timeout_s=settings.body_timeout_s,
        min_rate=settings.min_body_rate,
        logger=log,
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
    # alembic says each step at INFO; the store logs one store.migrated event
    logging.getLogger("alembic").setLevel(logging.WARNING)
    apply_threads(settings)
    install_access_log_filter()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )


__all__ = ["apply_threads", "create_app", "run"]
