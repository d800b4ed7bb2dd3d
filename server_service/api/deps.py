"""FastAPI dependencies as ``Annotated`` aliases: runtime, settings, session, callers.

``AdminDep`` / ``EdgeDep`` / ``EdgeOrAdminDep`` authenticate the bearer token (401 without
a valid one) and check the role (403).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from fedinspect.service import MAX_ID, Responses, error_responses
from fl_core.errors import AuthError, InvalidInput, PayloadTooLarge
from fl_core.schemas import ErrorResponse
from server_service.config import Settings
from server_service.db import Session
from server_service.runtime import Runtime
from server_service.services import auth
from server_service.services.auth import Caller


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_app_settings(request: Request) -> Settings:
    """The settings ``create_app(settings)`` was given."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(rt: RuntimeDep) -> Iterator[Session]:
    with rt.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(
    auto_error=False,
    description="The admin token (operators) or an edge token from POST /v1/edges.",
)


#: request state key under which :func:`get_caller` leaves the token it checked and its
#: caller, so that the request guard does not look the same token up again
_AUTHENTICATED = "fedinspect.authenticated"


def get_caller(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    token = credentials.credentials if credentials is not None else None
    caller = auth.authenticate(session, settings, token)
    request.scope.setdefault("state", {})[_AUTHENTICATED] = (token, caller)
    return caller


EdgeOrAdminDep = Annotated[Caller, Depends(get_caller)]


async def authenticate_scope(scope: Any, token: str | None) -> str:
    """The caller's key (``admin`` or ``edge:<id>``) for the request guard; AuthError
    (401) as the routes' own dependency would raise it."""
    rt: Runtime = scope["app"].state.runtime

    def lookup() -> Caller:
        with rt.sessions() as session:
            return auth.authenticate(session, rt.settings, token)

    if not token:
        raise AuthError(auth.MISSING_TOKEN)  # no database lookup for nothing
    checked = scope.get("state", {}).get(_AUTHENTICATED)
    if checked is not None and checked[0] == token:
        # The route's own dependency authenticated this very token, before the body
        # (FastAPI solves dependencies first): a second lookup per upload bought nothing.
        caller: Caller = checked[1]
    else:
        caller = await run_in_threadpool(lookup)
    return "admin" if caller.role == "admin" else f"edge:{caller.edge_id}"


def get_admin(caller: EdgeOrAdminDep) -> Caller:
    return auth.require_admin(caller)


AdminDep = Annotated[Caller, Depends(get_admin)]


def get_edge_id(caller: EdgeOrAdminDep) -> str:
    return auth.require_edge(caller)


EdgeDep = Annotated[str, Depends(get_edge_id)]
"""The calling edge's id (403 for the admin)."""

CycleId = Annotated[int, Path(ge=1, le=MAX_ID, description="cycle id")]
RoundNumber = Annotated[int, Path(ge=1, le=50, description="federated round, from 1")]
ModelVersion = Annotated[int, Path(ge=1, le=MAX_ID, description="model version")]
EdgeId = Annotated[
    str, Path(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$", description="edge id")
]

AUTH_ERRORS: Responses = error_responses(401)
ADMIN_ERRORS: Responses = {
    **AUTH_ERRORS,
    403: {"model": ErrorResponse, "description": "an edge token on an operator route"},
}
EDGE_ERRORS: Responses = {
    **AUTH_ERRORS,
    403: {"model": ErrorResponse, "description": "the admin token on an edge route"},
}


def check_content_length(request: Request, limit: int) -> None:
    """413 when the declared Content-Length exceeds ``limit`` (before reading a byte)."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise InvalidInput("Content-Length is not an integer") from None
    if length > limit:
        raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it would exceed ``limit`` bytes.

    Content-Length is checked up front; a chunked body is counted while streaming,
    and nothing past the limit is read.
    """
    check_content_length(request, limit)
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        if len(buffer) > limit:
            raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
    return bytes(buffer)


__all__ = [
    "ADMIN_ERRORS",
    "AUTH_ERRORS",
    "EDGE_ERRORS",
    "AdminDep",
    "CycleId",
    "EdgeDep",
    "EdgeId",
    "EdgeOrAdminDep",
    "ModelVersion",
    "RoundNumber",
    "RuntimeDep",
    "SessionDep",
    "SettingsDep",
    "authenticate_scope",
    "check_content_length",
    "get_caller",
    "get_runtime",
    "read_body_limited",
]
