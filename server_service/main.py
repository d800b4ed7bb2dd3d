"""The server app: :func:`create_app` builds it, :func:`run` serves it with uvicorn.

The lifespan creates the heavy objects (database engine, blob store, the training
executor, the base model on a fresh data dir), re-queues cycles a previous process
left in ``training``, and runs the deadline watcher until shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from fedinspect.guards import AdmissionControl, RequestGuard, RequestMetrics, Scope, route_needs
from fedinspect.pages import install_pages
from fedinspect.service import (
    configure_logging,
    error_reply,
    install_error_handlers,
    serve,
    settings_or_exit,
)
from fl_core import __version__
from fl_core.errors import ConfigError, InsufficientStorage, Unavailable, shorten
from server_service.api.deps import authenticate_scope, get_caller
from server_service.api.main import api_router
from server_service.config import Settings, get_settings
from server_service.db import make_sessionmaker
from server_service.logs import log_event, logger
from server_service.runtime import Runtime
from server_service.services.cycles import resume_training
from server_service.services.metrics import ServerMetrics
from server_service.services.models import ensure_base_model
from server_service.services.watcher import watch_deadlines
from server_service.storage import (
    DISK_FULL_DETAIL,
    database_unavailable,
    is_disk_full,
    open_storage,
)

STATIC_DIR = Path(__file__).parent / "static" / "ui"


def start_runtime(settings: Settings, metrics: ServerMetrics) -> Runtime:
    """Open the database and blob store, and make sure a base model exists."""
    engine, blobs = open_storage(settings)
    blobs.clean_tmp()  # leftovers of a killed process: never acknowledged, safe to drop
    runtime = Runtime(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        blobs=blobs,
        metrics=metrics,
        executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedinspect-train"),
        replica_id=settings.replica_name,
    )
    ensure_base_model(runtime)
    return runtime


def _storage_error(request: Request, exc: Exception) -> JSONResponse:
    if is_disk_full(exc):
        settings: Settings = request.app.state.runtime.settings
        log_event(
            "storage.full", logging.WARNING, data_dir=settings.data_dir, error=shorten(str(exc))
        )
        return error_reply(507, DISK_FULL_DETAIL)
    if isinstance(exc, OperationalError):  # a lost connection (a restarting PostgreSQL)
        return database_unavailable(request, exc)
    raise exc  # not ours to explain: the server's error handler answers 500


def _too_large(scope: Scope, limit: int) -> str:
    if scope["method"] == "PUT":
        return f"upload exceeds the limit of {limit} bytes"
    return f"request body too large: the limit is {limit} bytes"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The server app for ``settings`` (default: from the environment), kept as
    ``app.state.settings`` for the routes."""
    settings = settings or get_settings()
    metrics = ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await asyncio.to_thread(start_runtime, settings, metrics)
        app.state.runtime = runtime
        resumed = resume_training(runtime)
        watcher = asyncio.create_task(watch_deadlines(runtime))
        log_event(
            "server.started",
            data_dir=settings.data_dir,
            backbone=settings.backbone,
            replica=runtime.replica_id,
            resumed_cycles=",".join(map(str, resumed)) or None,
        )
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            # A running training stops at its next epoch and queued ones are dropped:
            # their cycles stay `training` in the database and the next start trains them.
            runtime.stopping.set()
            await asyncio.to_thread(runtime.executor.shutdown, wait=True, cancel_futures=True)
            runtime.engine.dispose()
            log_event("server.stopped")

    app = FastAPI(
        title="FedInspect server",
        version=__version__,
        summary="Training cycles of federated visual defect inspection.",
        lifespan=lifespan,
        docs_url=None,  # served offline by install_pages
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    for storage_error in (InsufficientStorage, OSError, OperationalError):
        app.add_exception_handler(storage_error, _storage_error)
    app.add_middleware(RequestMetrics, count=metrics.count_request)
    # A refused request costs no worker thread and no database connection.
    app.add_middleware(
        AdmissionControl,
        max_requests=settings.max_concurrent_requests,
        max_uploads=settings.max_concurrent_uploads,
        wait_s=settings.admission_wait_s,
    )
    # Outermost: 401 before a byte of the body is read, size and rate limits on bodies.
    app.add_middleware(
        RequestGuard,
        needs_auth=route_needs(get_caller),
        authenticate=authenticate_scope,
        max_upload_bytes=settings.max_upload_bytes,  # feature uploads: PUT
        max_request_bytes=settings.max_request_bytes,
        too_large_detail=_too_large,
        idle_timeout_s=settings.body_timeout_s,
        min_rate=settings.min_body_rate,
        logger=logger,
        max_uploads_per_caller=settings.max_concurrent_uploads_per_edge,
    )
    app.include_router(api_router)
    install_pages(app, STATIC_DIR)
    return app


def run(settings: Settings | None = None) -> None:
    """Serve the app with uvicorn on ``settings.host:settings.port``."""
    if settings is None:
        settings = settings_or_exit(Settings, "server")
    configure_logging(logger, settings.log_level)
    try:
        # Before uvicorn: a storage problem is one line, not a lifespan traceback.
        engine, _blobs = open_storage(settings)
        engine.dispose()
    except (ConfigError, Unavailable) as exc:
        sys.exit(f"fedinspect server: {exc.detail}")
    serve(create_app(settings), settings)


__all__ = ["create_app", "run", "start_runtime"]
