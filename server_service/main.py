"""The server app: :func:`create_app` builds it, :func:`run` serves it with uvicorn.

The lifespan creates the heavy objects (database engine, blob store, the training
executor, the base model on a fresh data dir), re-queues cycles a previous process
left in ``training``, and runs the deadline watcher until shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from fl_core import __version__
from fl_core.errors import AuthError, ConfigError, FedInspectError, Forbidden, Unavailable
from server_service.admission import AdmissionControl
from server_service.api.main import api_router
from server_service.config import Settings, get_settings
from server_service.db import make_sessionmaker
from server_service.logs import configure_logging, log_event
from server_service.metrics import RequestMetricsMiddleware, ServerMetrics
from server_service.runtime import Runtime
from server_service.services.cycles import resume_training
from server_service.services.models import ensure_base_model
from server_service.services.watcher import watch_deadlines
from server_service.storage import RETRY_AFTER_S, database_unavailable, open_storage


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


def _fedinspect_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FedInspectError)
    headers = None
    if isinstance(exc, AuthError) and not isinstance(exc, Forbidden):
        headers = {"WWW-Authenticate": "Bearer"}
    if exc.http_status == 503:
        headers = {"Retry-After": RETRY_AFTER_S}
    return JSONResponse({"detail": exc.detail}, status_code=exc.http_status, headers=headers)


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The server app for ``settings`` (default: from the environment)."""
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
    )
    app.add_exception_handler(FedInspectError, _fedinspect_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_middleware(RequestMetricsMiddleware, get_metrics=lambda: metrics)
    # Outermost: a refused request costs no worker thread and no database connection.
    app.add_middleware(
        AdmissionControl,
        max_requests=settings.max_concurrent_requests,
        max_uploads=settings.max_concurrent_uploads,
        wait_s=settings.admission_wait_s,
    )
    app.include_router(api_router)
    return app


def run(settings: Settings | None = None) -> None:
    """Serve the app with uvicorn on ``settings.host:settings.port``."""
    if settings is None:
        try:
            settings = get_settings()
        except ConfigError as exc:
            sys.exit(f"fedinspect server: {exc.detail}")
    configure_logging(settings.log_level)
    try:
        # Before uvicorn: a storage problem is one line, not a lifespan traceback.
        engine, _blobs = open_storage(settings)
        engine.dispose()
    except (ConfigError, Unavailable) as exc:
        sys.exit(f"fedinspect server: {exc.detail}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )


__all__ = ["create_app", "run", "start_runtime"]
