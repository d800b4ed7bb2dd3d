"""Plumbing the server and the edge share, written once so that the two cannot drift.

Both services have the same shape: one pydantic-settings class (``FEDINSPECT_SERVER_*``
/ ``FEDINSPECT_EDGE_*``) read by :func:`load_settings`, passed to
``create_app(settings)``, which keeps it as ``app.state.settings`` for the routes'
``SettingsDep``; thin routes over service functions; and what follows, from here:

- errors: :func:`install_error_handlers` maps the ``fl_core.errors`` tree and request
  validation to ``{"detail": ...}`` (``WWW-Authenticate`` on every 401 and only there,
  ``Retry-After`` on 503); :func:`error_responses` documents them in OpenAPI;
  :data:`MAX_ID` bounds integer ids in paths and queries;
- settings: :class:`ServiceSettings` (the fields every service has: address, log
  level, request limits), :func:`load_settings` names every invalid variable in one
  :class:`~fl_core.errors.ConfigError`, :func:`settings_or_exit` turns it into one
  line at start, :func:`token_problem` judges an operator token;
- storage: :func:`utcnow` and :class:`UTCDateTime` (aware UTC datetimes on every
  backend), :func:`make_engine` (SQLite with WAL, FULL sync and foreign keys);
- running: :func:`serve` (uvicorn where the settings say);
- logs and metrics: :func:`configure_logging` and :func:`log_event` (one line per
  event, ``event=... key=value``), :func:`redact_url`, a filter that keeps query
  strings out of uvicorn's access log, and :class:`RequestCounter`.

The ASGI middleware in front of the routes (auth before the body, body limits,
admission control, request counts) is in :mod:`fedinspect.guards`.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import DateTime, Dialect, Engine, TypeDecorator, create_engine, event

from fl_core.errors import ConfigError, FedInspectError, shorten
from fl_core.schemas import ErrorResponse

# ---------------------------------------------------------------------------- errors

#: largest integer id (cycle, model version, job's model, local model): integer
#: columns are 32-bit on PostgreSQL, so larger ids are refused as input, not a 500
MAX_ID = 2**31 - 1

#: an error detail never repeats more of the caller's input than this
MAX_DETAIL_CHARS = 1000

#: seconds a client is told to wait before retrying a 503
RETRY_AFTER_S = "2"

#: the challenge sent with every 401, and only with a 401
AUTH_CHALLENGE = {"WWW-Authenticate": "Bearer"}

Responses = dict[int | str, dict[str, Any]]

#: what the OpenAPI schema says of an error code, unless a route says more
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "malformed request body (not parseable JSON or multipart)",
    401: "missing, unknown or revoked token",
    403: "a token without the role this route needs",
    404: "no such resource",
    409: "conflicts with the current state",
    413: "request body too large",
    422: "invalid input",
}

#: the 503 of admission control, documented on every route but /health
BUSY_RESPONSES: Responses = {
    503: {
        "model": ErrorResponse,
        "description": "the service is at its limit of concurrent requests or uploads; "
        "retry after the number of seconds in Retry-After",
        "headers": {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer"},
            }
        },
    }
}


def error_responses(*codes: int, base: Responses | None = None) -> Responses:
    """OpenAPI ``responses`` of a route's error answers (all ``{"detail": ...}``):
    ``base`` (entries with route-specific descriptions), then one entry per code."""
    out: Responses = dict(base or {})
    for code in codes:
        description = ERROR_DESCRIPTIONS.get(code) or HTTPStatus(code).phrase
        out[code] = {"model": ErrorResponse, "description": description}
    return out


def error_reply(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A ``{"detail": ...}`` answer, with the challenge on a 401 and Retry-After on a
    503 unless ``headers`` says otherwise."""
    extra: dict[str, str] = {}
    if status == 401:
        extra.update(AUTH_CHALLENGE)
    elif status == 503:
        extra["Retry-After"] = RETRY_AFTER_S
    extra.update(headers or {})
    return JSONResponse(
        {"detail": shorten(detail, MAX_DETAIL_CHARS)}, status_code=status, headers=extra or None
    )


async def _fedinspect_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FedInspectError)
    return error_reply(exc.http_status, exc.detail)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    # One string, like every other error of the API (ErrorResponse), not FastAPI's list.
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(shorten(str(part)) for part in err.get("loc", ()))
        problems.append(f"{where}: {shorten(str(err.get('msg', 'invalid')))}")
    return error_reply(422, "; ".join(problems) or "invalid request")


def install_error_handlers(app: FastAPI) -> None:
    """Map the ``fl_core.errors`` tree and request validation to ``{"detail": ...}``."""
    app.add_exception_handler(FedInspectError, _fedinspect_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


# ---------------------------------------------------------------------------- settings

MIN_TOKEN_CHARS = 16
MIN_TOKEN_DISTINCT_CHARS = 8

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ServiceSettings(BaseSettings):
    """The settings every service has: where it listens, its log level and the limits
    its guards put on requests. A service's class adds its own fields and sets its
    ``env_prefix`` (``FEDINSPECT_SERVER_`` / ``FEDINSPECT_EDGE_``)."""

    model_config = SettingsConfigDict(
        env_nested_delimiter="__", case_sensitive=False, extra="ignore"
    )

    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the API listens on.")
    log_level: LogLevel = Field(default="INFO", description="Log level of the service.")
    max_request_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Largest body of any request but an upload (the server's feature "
        "uploads, the edge's POST /v1/predict), bytes.",
    )
    max_concurrent_requests: int = Field(
        default=32,
        ge=1,
        description="Requests handled at once; more wait up to ADMISSION_WAIT_S, then get "
        "503 with Retry-After (/health is exempt).",
    )
    admission_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="How long a request over the concurrency limits waits for a slot "
        "before it is answered 503, in seconds.",
    )
    body_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="A request body that pauses longer than this, in seconds, is cut off "
        "with 408 (so slow clients cannot hold admission slots).",
    )
    min_body_rate: float = Field(
        default=16 * 1024,
        gt=0,
        description="Slowest average rate a request body may arrive at once BODY_TIMEOUT_S "
        "has passed, bytes per second; slower bodies are cut off with 408.",
    )


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def token_problem(token: str) -> str | None:
    """Why an operator token is too weak to use, or None: at least 16 characters, and
    at least 8 different ones (``aaaaaaaaaaaaaaaa`` and 16 spaces are refused)."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"must be at least {MIN_TOKEN_CHARS} characters"
    if token != token.strip():
        return "must not start or end with whitespace"
    if len(set(token)) < MIN_TOKEN_DISTINCT_CHARS:
        return (
            f"has almost no entropy (fewer than {MIN_TOKEN_DISTINCT_CHARS} different "
            "characters): use a random one, e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"
        )
    return None


def load_settings(cls: type[SettingsT], what: str) -> SettingsT:
    """``cls`` read from the environment; one ConfigError naming every invalid
    variable (``FEDINSPECT_EDGE_PORT: ...``) when they are incomplete or wrong."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    nested = str(cls.model_config.get("env_nested_delimiter") or "__")
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = nested.join(str(p) for p in err["loc"]).upper()
            problems.append(f"{prefix}{loc}: {err['msg']}" if loc else str(err["msg"]))
        raise ConfigError(
            f"invalid {what} settings: "
            + "; ".join(problems)
            + f" (set them in the environment, e.g. {prefix}ADMIN_TOKEN)"
        ) from None


def settings_or_exit(cls: type[SettingsT], what: str) -> SettingsT:
    """:func:`load_settings` for a command: invalid settings end the process with one
    line (``fedinspect server: invalid server settings: ...``), no traceback."""
    try:
        return load_settings(cls, what)
    except ConfigError as exc:
        sys.exit(f"fedinspect {what}: {exc.detail}")


# ---------------------------------------------------------------------------- storage


def utcnow() -> datetime:
    """Now, as an aware UTC datetime: the one clock of every stored timestamp."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: the API reads while a worker thread (training, a job) writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed (acknowledged) row survives a power cut, not only a kill -9.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, FULL sync, foreign keys, a busy timeout
    and cross-thread use; other databases a bounded, pre-pinged pool."""
    if url.startswith("sqlite"):
        # Connections must outnumber what admitted requests can hold at once (up to two
        # each, plus the worker threads): a request waiting for a pooled connection
        # holds a worker thread, and enough of those starve the very requests that
        # would give connections back. SQLite connections are cheap.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=10,
            max_overflow=90,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: after a database restart, stale pooled connections are replaced instead
    # of failing the next request; a bounded connect time lets a request answer 503
    # while the database is down instead of hanging.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=40,
        pool_timeout=10,
        connect_args=connect_args,
    )


# ---------------------------------------------------------------------------- logs


def _render(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return repr(text)
    return text


def log_event(
    logger: logging.Logger,
    event: str,
    level: int = logging.INFO,
    exc_info: bool = False,
    **fields: object,
) -> None:
    """Log one event as ``event=<name> key=value ...`` (None values are left out;
    values with spaces or quotes are quoted, so a line stays machine-parsable). Tokens
    are never passed here."""
    parts = [f"event={event}"] + [
        f"{key}={_render(value)}" for key, value in fields.items() if value is not None
    ]
    logger.log(level, " ".join(parts), exc_info=exc_info)


class RequestCounter:
    """HTTP requests by route template, method and status (``<prefix>_requests``) in a
    service's own registry; :class:`fedinspect.guards.RequestMetrics` calls it."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            f"{prefix}_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )

    def __call__(self, route: str, method: str, status: str) -> None:
        self.counter.labels(route=route, method=method, status=status).inc()


class StripQueryFilter(logging.Filter):
    """Drops the query string from uvicorn's access-log lines: a token that a
    misconfigured client puts in a URL must not land in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path = args[2].split("?", 1)[0]
            record.args = (args[0], args[1], path, args[3], args[4])
        return True


def install_access_log_filter() -> None:
    """Add :class:`StripQueryFilter` to uvicorn's access logger (once)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, StripQueryFilter) for f in access.filters):
        access.addFilter(StripQueryFilter())


def configure_logging(logger: logging.Logger, level: str) -> None:
    """Plain one-line records on stderr at ``level`` for a service's ``run()`` (tests
    keep pytest's handlers), with query strings kept out of the access log."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=False
    )
    logger.setLevel(level)
    # alembic says each step at INFO; the services log one migrated event
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    install_access_log_filter()


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve ``app`` with uvicorn where ``settings`` say, at their log level."""
    import uvicorn  # only a running service needs it

    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())


def redact_url(url: str) -> str:
    """``url`` with any user info (``user:password@``) replaced by ``***@``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


__all__ = [
    "AUTH_CHALLENGE",
    "BUSY_RESPONSES",
    "ERROR_DESCRIPTIONS",
    "MAX_DETAIL_CHARS",
    "MAX_ID",
    "RETRY_AFTER_S",
    "LogLevel",
    "RequestCounter",
    "Responses",
    "ServiceSettings",
    "StripQueryFilter",
    "UTCDateTime",
    "configure_logging",
    "error_reply",
    "error_responses",
    "install_access_log_filter",
    "install_error_handlers",
    "load_settings",
    "log_event",
    "make_engine",
    "redact_url",
    "serve",
    "settings_or_exit",
    "token_problem",
    "utcnow",
]
