"""``/v1/cycles``: request or join a cycle, upload features, train, cancel, inspect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from fedinspect.service import error_responses
from fl_core.schemas import Cycle, CycleState, ErrorResponse, RoundUpdateAck, UploadAck
from server_service.api.deps import (
    ADMIN_ERRORS,
    AUTH_ERRORS,
    EDGE_ERRORS,
    AdminDep,
    CycleId,
    EdgeDep,
    EdgeOrAdminDep,
    RoundNumber,
    RuntimeDep,
    SessionDep,
    check_content_length,
    read_body_limited,
)
from server_service.runtime import Runtime
from server_service.services import cycles, rounds, uploads

router = APIRouter(prefix="/v1/cycles", tags=["cycles"])

#: the OpenAPI request body of an upload: safetensors bytes
BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}

_Ack = TypeVar("_Ack", UploadAck, RoundUpdateAck)


async def _receive(
    request: Request,
    response: Response,
    rt: Runtime,
    check: Callable[[], None],
    store: Callable[[bytes], tuple[_Ack, bool]],
) -> _Ack:
    """An edge's upload: an oversized declared body and what no body could make succeed
    are refused before a byte is read; then the body, bounded, is checked and stored
    (201 when new, 200 when unchanged or replaced)."""
    limit = rt.settings.max_upload_bytes
    check_content_length(request, limit)
    await run_in_threadpool(check)
    body = await read_body_limited(request, limit)
    ack, created = await run_in_threadpool(store, body)
    response.status_code = 201 if created else 200
    return ack


@router.post(
    "",
    summary="Join the collecting cycle, or open one (201) when none is collecting",
    response_model=Cycle,
    responses={
        201: {"model": Cycle, "description": "a new cycle was opened"},
        **EDGE_ERRORS,
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse, "description": "no base model registered"},
    },
)
def request_cycle(
    rt: RuntimeDep, session: SessionDep, caller: EdgeOrAdminDep, response: Response
) -> Cycle:
    cycle, created = cycles.open_or_join(rt, session, caller)
    response.status_code = 201 if created else 200
    return cycle


@router.get(
    "",
    summary="List cycles, newest first",
    response_model=list[Cycle],
    responses=error_responses(422, base=AUTH_ERRORS),
)
def list_cycles(
    session: SessionDep,
    _caller: EdgeOrAdminDep,
    state: Annotated[CycleState | None, Query(description="only cycles in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Cycle]:
    return cycles.list_cycles(session, state, limit)


@router.get(
    "/{cycle_id}",
    summary="A cycle: state, uploads, joined edges, quorum, deadline, result, metrics",
    response_model=Cycle,
    responses=error_responses(404, 422, base=AUTH_ERRORS),
)
def get_cycle(cycle_id: CycleId, session: SessionDep, _caller: EdgeOrAdminDep) -> Cycle:
    return cycles.get_cycle(session, cycle_id)


@router.put(
    "/{cycle_id}/features",
    summary="Upload this edge's features and labels (safetensors body)",
    description=(
        "Body: a safetensors file with `features` [N, ...] in the spec's dtype, `labels` [N] "
        "int64 (and `scale` [N] float32 for int8), metadata `fedinspect.spec_hash` equal to "
        "the cycle's spec hash. Idempotent: the same bytes again answer 200 with "
        "`unchanged=true`; different bytes replace the edge's earlier upload while the "
        "cycle is collecting (`replaced=true`) and are refused (409) afterwards."
    ),
    status_code=201,
    response_model=UploadAck,
    responses={
        200: {"model": UploadAck, "description": "unchanged or replaced"},
        **error_responses(404, 409, 413, 422, base=EDGE_ERRORS),
    },
    openapi_extra=BINARY_BODY,
)
async def upload_features(
    cycle_id: CycleId,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    edge_id: EdgeDep,
) -> UploadAck:
    return await _receive(
        request,
        response,
        rt,
        lambda: uploads.check_upload_allowed(rt, cycle_id, edge_id),
        lambda body: uploads.store_upload(rt, cycle_id, edge_id, body),
    )


@router.put(
    "/{cycle_id}/rounds/{round_number}/update",
    summary="Upload this edge's update of a federated fine-tuning round (safetensors body)",
    description=(
        "Body: a safetensors file holding, for each parameter the round trains (the stages "
        "from the plan's `train_from` up, and the head), the edge's trained value minus the "
        "round model's, in the plan's dtype, with L2 norm (all tensors as one vector) at most "
        "the plan's `clip_norm`; metadata `fedinspect.spec_hash` (the cycle's), "
        "`fedinspect.round`, `fedinspect.base_model_version` (the cycle's "
        "`round_model_version`) and `fedinspect.samples` (training images, the edge's "
        "weight in the average). Only an edge that uploaded features to the cycle takes "
        "part (403 otherwise). Idempotent: the same bytes again answer 200 with "
        "`unchanged=true`; different bytes replace the edge's earlier update while the "
        "round runs and are refused (409) after it."
    ),
    status_code=201,
    response_model=RoundUpdateAck,
    responses={
        200: {"model": RoundUpdateAck, "description": "unchanged or replaced"},
        **error_responses(404, 409, 413, 422, base=EDGE_ERRORS),
        403: {
            "model": ErrorResponse,
            "description": "the admin token, or an edge that uploaded no features to the cycle",
        },
    },
    openapi_extra=BINARY_BODY,
)
async def upload_round_update(
    cycle_id: CycleId,
    round_number: RoundNumber,
    request: Request,
    response: Response,
    rt: RuntimeDep,
    edge_id: EdgeDep,
) -> RoundUpdateAck:
    return await _receive(
        request,
        response,
        rt,
        lambda: rounds.check_update_allowed(rt, cycle_id, round_number, edge_id),
        lambda body: rounds.store_update(rt, cycle_id, round_number, edge_id, body),
    )


@router.post(
    "/{cycle_id}/train",
    summary="Close collection now and train on the uploads so far",
    response_model=Cycle,
    responses=error_responses(404, 409, 413, 422, base=ADMIN_ERRORS),
)
def train_cycle(cycle_id: CycleId, rt: RuntimeDep, _admin: AdminDep) -> Cycle:
    return cycles.train_now(rt, cycle_id)


@router.post(
    "/{cycle_id}/cancel",
    summary="Cancel a collecting or training cycle, or one whose rounds run",
    response_model=Cycle,
    responses=error_responses(404, 409, 413, 422, base=ADMIN_ERRORS),
)
def cancel_cycle(cycle_id: CycleId, rt: RuntimeDep, _admin: AdminDep) -> Cycle:
    return cycles.cancel(rt, cycle_id)
