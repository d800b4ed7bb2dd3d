"""Build and run the edge app: ``create_app`` for tests and servers, ``run`` for the
``fedinspect edge`` command (uvicorn, settings from the environment)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

import fl_core
from edge_service.api.deps import check_admin, require_admin
from edge_service.api.main import api_router
from edge_service.config import Settings, get_settings
from edge_service.services.context import build_context
from fedinspect.guards import AdmissionControl, RequestGuard, RequestMetrics, Scope, route_needs
from fedinspect.pages import install_pages
from fedinspect.service import (
    configure_logging,
    install_error_handlers,
    log_event,
    redact_url,
    serve,
    settings_or_exit,
)

log = logging.getLogger("edge_service")

STATIC_DIR = Path(__file__).parent / "static" / "ui"


def _is_predict(scope: Scope) -> bool:
    """Predictions are the edge's uploads: images, under their own body and slot limits."""
    return (scope["method"], scope["path"]) == ("POST", "/v1/predict")


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
    from settings and closed with the app. ``settings`` (default: from the environment)
    are kept as ``app.state.settings`` for the routes."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = build_context(settings, server_client)
        app.state.ctx = ctx
        log_event(
            log,
            "started",
            edge=settings.name,
            server=redact_url(settings.server_url),
            dataset=settings.dataset,
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
    app.state.settings = settings
    install_error_handlers(app)

    def count_request(route: str, method: str, status: str) -> None:
        ctx = getattr(app.state, "ctx", None)  # the metrics live from start to shutdown
        if ctx is not None:
            ctx.metrics.count_request(route, method, status)

    app.add_middleware(RequestMetrics, count=count_request)
    app.add_middleware(
        AdmissionControl,
        max_requests=settings.max_concurrent_requests,
        max_uploads=settings.max_concurrent_predictions,
        wait_s=settings.admission_wait_s,
        is_upload=_is_predict,
    )
    # Outermost: 401 before a byte of the body is read, size and rate limits on bodies.
    app.add_middleware(
        RequestGuard,
        needs_auth=route_needs(require_admin),
        authenticate=_authenticate(settings),
        is_upload=_is_predict,
        max_upload_bytes=settings.max_predict_bytes,
        max_request_bytes=settings.max_request_bytes,
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
    if settings is None:
        settings = settings_or_exit(Settings, "edge")
    configure_logging(log, settings.log_level)
    apply_threads(settings)
    serve(create_app(settings), settings)


__all__ = ["apply_threads", "create_app", "run"]
