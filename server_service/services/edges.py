"""Edge registration, listing, revocation and token rotation."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from fl_core.errors import Conflict, NotFound
from fl_core.schemas import EdgeCreate, EdgeCreated, EdgeInfo
from server_service.db import EdgeRow, Session, utcnow
from server_service.logs import log_event
from server_service.services.auth import hash_token, new_token


def _info(row: EdgeRow) -> EdgeInfo:
    return EdgeInfo(edge_id=row.id, name=row.name, created_at=row.created_at, revoked=row.revoked)


def _get(session: Session, edge_id: str) -> EdgeRow:
    row = session.get(EdgeRow, edge_id)
    if row is None:
        raise NotFound(f"edge {edge_id!r} not found")
    return row


def create_edge(session: Session, body: EdgeCreate) -> EdgeCreated:
    """Register an edge; its token is returned once and only its hash is stored."""
    taken = session.scalar(
        select(EdgeRow.id).where(EdgeRow.name == body.name, EdgeRow.revoked.is_(False))
    )
    if taken is not None:
        raise Conflict(f"an edge named {body.name!r} is already registered")
    token = new_token()
    row = EdgeRow(
        id=f"edge-{secrets.token_hex(6)}",
        name=body.name,
        token_hash=hash_token(token),
        created_at=utcnow(),
        revoked=False,
    )
    session.add(row)
    try:
        session.commit()
    except DBIntegrityError:
        # A concurrent registration of the same name won (unique index on active names).
        session.rollback()
        raise Conflict(f"an edge named {body.name!r} is already registered") from None
    log_event("edge.created", edge_id=row.id, name=row.name)
    return EdgeCreated(edge_id=row.id, name=row.name, token=token)


def list_edges(session: Session) -> list[EdgeInfo]:
    rows = session.scalars(select(EdgeRow).order_by(EdgeRow.created_at, EdgeRow.id))
    return [_info(r) for r in rows]


def revoke_edge(session: Session, edge_id: str) -> EdgeInfo:
    """Revoke an edge: its token stops working at once. Its past uploads stay."""
    row = _get(session, edge_id)
    row.revoked = True
    session.commit()
    log_event("edge.revoked", edge_id=edge_id)
    return _info(row)


def rotate_token(session: Session, edge_id: str) -> EdgeCreated:
    """Issue a new token for an edge; the old one stops working."""
    row = _get(session, edge_id)
    if row.revoked:
        raise Conflict(f"edge {edge_id!r} is revoked")
    token = new_token()
    row.token_hash = hash_token(token)
    session.commit()
    log_event("edge.token_rotated", edge_id=edge_id)
    return EdgeCreated(edge_id=row.id, name=row.name, token=token)


__all__ = ["create_edge", "list_edges", "revoke_edge", "rotate_token"]
