"""``GET /metrics``: Prometheus text exposition of this edge's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from edge_service.api.deps import ContextDep

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_model=str,
    summary="Prometheus metrics: jobs by state, predictions, latency, bytes moved",
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(ctx: ContextDep) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
