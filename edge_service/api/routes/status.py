"""``GET /v1/status``: who this edge is, its data, its model, its last cycle and job."""

from __future__ import annotations

from fastapi import APIRouter

from edge_service.api.deps import ContextDep
from fl_core.schemas import EdgeStatus

router = APIRouter(prefix="/v1", tags=["status"])


@router.get("/status", response_model=EdgeStatus, summary="Edge status")
def status(ctx: ContextDep) -> EdgeStatus:
    return ctx.status()
