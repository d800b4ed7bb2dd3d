"""``GET /metrics``: Prometheus text exposition (needs a token, edge or admin)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server_service.api.deps import AUTH_ERRORS, EdgeOrAdminDep, RuntimeDep, SessionDep
from server_service.services.cycles import counts_by_state

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests, upload bytes, cycles by state, training time",
    response_class=Response,
    response_model=None,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        **AUTH_ERRORS,
    },
)
def metrics(rt: RuntimeDep, session: SessionDep, _caller: EdgeOrAdminDep) -> Response:
    body = rt.metrics.render(counts_by_state(session))
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
