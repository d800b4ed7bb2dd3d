"""Dependencies of the routes: settings, the edge context, and operator auth.

Settings come from a cached function, which ``create_app`` overrides with the settings
it was given, so tests never touch the environment.
"""

from __future__ import annotations

import hmac
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edge_service.config import Settings
from edge_service.services.context import EdgeContext
from fl_core.errors import AuthError
from fl_core.schemas import ErrorResponse


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # admin_token comes from the environment


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


_ERROR_DESCRIPTIONS = {
    400: "Malformed request body (not parseable JSON or multipart)",
    401: "Missing or wrong admin token",
    404: "No such resource",
    409: "Conflicts with the edge's current state",
    413: "Request or image too large",
    422: "Invalid input",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers of a route (all ``{"detail": ...}``)."""
    return {
        code: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]}
        for code in (401, *codes)
    }


SettingsDep = Annotated[Settings, Depends(get_settings)]
ContextDep = Annotated[EdgeContext, Depends(get_context)]

__all__ = [
    "ContextDep",
    "SettingsDep",
    "check_admin",
    "error_responses",
    "get_context",
    "get_settings",
    "require_admin",
]
