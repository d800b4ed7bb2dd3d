"""``/v1/edges``: register, list, revoke edges and rotate their tokens (operators)."""

from __future__ import annotations

from fastapi import APIRouter

from fedinspect.service import error_responses
from fl_core.schemas import EdgeCreate, EdgeCreated, EdgeInfo
from server_service.api.deps import ADMIN_ERRORS, AdminDep, EdgeId, SessionDep
from server_service.services import edges

router = APIRouter(prefix="/v1/edges", tags=["edges"])


@router.post(
    "",
    summary="Register an edge and issue its token (shown once)",
    status_code=201,
    response_model=EdgeCreated,
    responses=error_responses(400, 409, 413, 422, base=ADMIN_ERRORS),
)
def create_edge(body: EdgeCreate, session: SessionDep, _admin: AdminDep) -> EdgeCreated:
    return edges.create_edge(session, body)


@router.get(
    "",
    summary="List registered edges",
    response_model=list[EdgeInfo],
    responses=ADMIN_ERRORS,
)
def list_edges(session: SessionDep, _admin: AdminDep) -> list[EdgeInfo]:
    return edges.list_edges(session)


@router.delete(
    "/{edge_id}",
    summary="Revoke an edge: its token stops working",
    response_model=EdgeInfo,
    responses=error_responses(404, 422, base=ADMIN_ERRORS),
)
def revoke_edge(edge_id: EdgeId, session: SessionDep, _admin: AdminDep) -> EdgeInfo:
    return edges.revoke_edge(session, edge_id)


@router.post(
    "/{edge_id}/token",
    summary="Rotate an edge's token: returns a new one, the old one stops working",
    response_model=EdgeCreated,
    responses=error_responses(404, 409, 413, 422, base=ADMIN_ERRORS),
)
def rotate_token(edge_id: EdgeId, session: SessionDep, _admin: AdminDep) -> EdgeCreated:
    return edges.rotate_token(session, edge_id)
