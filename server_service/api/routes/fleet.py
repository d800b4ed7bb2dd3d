"""The fleet: edges report their evaluation after stage 3; operators read the overview
the dashboard shows (``/ui``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from fedinspect.service import error_responses
from fl_core.errors import InvalidInput
from fl_core.schemas import EdgeEvaluation, EdgeEvaluationReport, Overview
from server_service.api.deps import (
    ADMIN_ERRORS,
    EDGE_ERRORS,
    AdminDep,
    EdgeDep,
    ModelVersion,
    RuntimeDep,
    SessionDep,
    read_body_limited,
)
from server_service.services import fleet

router = APIRouter(prefix="/v1", tags=["fleet"])

#: an evaluation report is metrics of at most four models: a few KB for tens of classes
MAX_REPORT_BYTES = 64 * 1024


@router.put(
    "/models/{version}/evaluation",
    summary="Report this edge's evaluation of a server model (after stage 3)",
    description=(
        "Body: `EdgeEvaluationReport`, the test-split metrics of each model the edge's "
        "deploy gate weighed (the fine-tuned candidate, the server's model, the previous "
        "one, the one that serves now) and the gate's decision. Metrics only: no image or "
        f"feature. At most {MAX_REPORT_BYTES} bytes; a new report replaces the edge's "
        "earlier one for the same version."
    ),
    response_model=EdgeEvaluation,
    responses=error_responses(404, 413, 422, base=EDGE_ERRORS),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/EdgeEvaluationReport"}
                }
            },
        }
    },
)
async def report_evaluation(
    version: ModelVersion, request: Request, rt: RuntimeDep, edge_id: EdgeDep
) -> EdgeEvaluation:
    body = await read_body_limited(request, MAX_REPORT_BYTES)
    try:
        report = EdgeEvaluationReport.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInput(f"{where}: {first.get('msg', 'invalid')}") from None

    def store() -> EdgeEvaluation:
        with rt.sessions() as session:
            return fleet.store_report(session, edge_id, version, report)

    return await run_in_threadpool(store)


@router.get(
    "/evaluations",
    summary="Edges' evaluation reports, oldest model version first",
    response_model=list[EdgeEvaluation],
    responses=error_responses(422, base=ADMIN_ERRORS),
)
def list_evaluations(
    session: SessionDep,
    _admin: AdminDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[EdgeEvaluation]:
    return fleet.list_evaluations(session, limit)


@router.get(
    "/overview",
    summary="Edges, recent cycles, models, evaluations and training progress at once",
    response_model=Overview,
    responses=ADMIN_ERRORS,
)
def overview(session: SessionDep, rt: RuntimeDep, _admin: AdminDep) -> Overview:
    return fleet.overview(session, rt.training_board)
