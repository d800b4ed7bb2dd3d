"""Dependencies of the routes: settings, the edge context, and operator auth.

Settings are the ones ``create_app(settings)`` was given (``app.state.settings``), as on
the server, so tests never touch the environment.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edge_service.config import Settings
from edge_service.services.context import EdgeContext
from fedinspect.service import Responses
from fl_core.errors import AuthError
from fl_core.schemas import ErrorResponse


def get_settings(request: Request) -> Settings:
    """The settings ``create_app(settings)`` was given."""
    settings: Settings = request.app.state.settings
    return settings


def get_context(request: Request) -> EdgeContext:
    ctx: EdgeContext = request.app.state.ctx
    return ctx


_bearer = HTTPBearer(auto_error=False, description="the edge's admin token")


def check_admin(settings: Settings, token: str | None) -> None:
    """AuthError (401) unless ``token`` is this edge's admin token."""
    if token is None:
        raise AuthError("missing bearer token: send Authorization: Bearer <admin token>")
    expected = settings.admin_token.get_secret_value().encode()
    # constant-time comparison: response timing must not reveal a token's prefix
    if not hmac.compare_digest(token.encode(), expected):
        raise AuthError("invalid token")


def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the request carries ``Authorization: Bearer <admin token>``."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        check_admin(settings, None)
    else:
        check_admin(settings, credentials.credentials)


#: the 401 of every route but /health, declared once on the router that requires it
ADMIN_ERRORS: Responses = {
    401: {"model": ErrorResponse, "description": "missing or wrong admin token"},
}


SettingsDep = Annotated[Settings, Depends(get_settings)]
ContextDep = Annotated[EdgeContext, Depends(get_context)]

__all__ = [
    "ADMIN_ERRORS",
    "ContextDep",
    "SettingsDep",
    "check_admin",
    "get_context",
    "get_settings",
    "require_admin",
]
