"""Bearer tokens: the admin token from settings, and one hashed token per edge."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select

from fl_core.errors import AuthError, Forbidden
from server_service.config import Settings
from server_service.db import EdgeRow, Session

Role = Literal["admin", "edge"]

MISSING_TOKEN = "missing bearer token"


@dataclass(frozen=True)
class Caller:
    """Who made a request: an operator (admin) or one registered edge."""

    role: Role
    edge_id: str | None = None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(session: Session, settings: Settings, token: str | None) -> Caller:
    """The caller a bearer token belongs to; AuthError (401) when there is none."""
    if not token:
        raise AuthError(MISSING_TOKEN)
    admin = settings.admin_token.get_secret_value().encode()
    if hmac.compare_digest(token.encode(), admin):
        return Caller(role="admin")
    digest = hash_token(token)
    row = session.scalar(select(EdgeRow).where(EdgeRow.token_hash == digest))
    if row is None or row.revoked or not hmac.compare_digest(row.token_hash, digest):
        raise AuthError("invalid or revoked token")
    return Caller(role="edge", edge_id=row.id)


def require_admin(caller: Caller) -> Caller:
    if caller.role != "admin":
        raise Forbidden("admin token required")
    return caller


def require_edge(caller: Caller) -> str:
    """The edge id of an edge caller; Forbidden for the admin."""
    if caller.role != "edge" or caller.edge_id is None:
        raise Forbidden("edge token required")
    return caller.edge_id


__all__ = ["Caller", "Role", "authenticate", "hash_token", "new_token", "require_admin"]
