"""Jobs: start a whole cycle, or stage 2 or stage 3 alone; read their state."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Field

from edge_service.api.deps import ContextDep
from fedinspect.service import MAX_ID, error_responses
from fl_core.schemas import Job, JobKind

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class FinetuneRequest(BaseModel):
    model_version: int | None = Field(
        default=None,
        ge=1,
        le=MAX_ID,
        description="server model to fine-tune; default: the latest",
    )


@router.post(
    "/cycle",
    response_model=Job,
    status_code=202,
    summary="Run a whole training cycle (request, extract, upload, wait, fine-tune, gate)",
    responses=error_responses(409),
)
def start_cycle(ctx: ContextDep) -> Job:
    return ctx.start_job(JobKind.cycle)


@router.post(
    "/extract",
    response_model=Job,
    status_code=202,
    summary="Stage 2 only: join a cycle, extract and upload features",
    responses=error_responses(409),
)
def start_extract(ctx: ContextDep) -> Job:
    return ctx.start_job(JobKind.extract)


@router.post(
    "/finetune",
    response_model=Job,
    status_code=202,
    summary="Stage 3 only: fine-tune a server model on local data, evaluate, gate, deploy",
    responses=error_responses(400, 409, 422),
)
def start_finetune(
    ctx: ContextDep,
    model_version: Annotated[
        int | None,
        Query(ge=1, le=MAX_ID, description="server model version; default: the latest"),
    ] = None,
    body: Annotated[FinetuneRequest | None, Body()] = None,
) -> Job:
    version = model_version if model_version is not None else (body.model_version if body else None)
    return ctx.start_job(JobKind.finetune, version)


@router.get(
    "", response_model=list[Job], summary="Jobs, newest first", responses=error_responses(422)
)
def list_jobs(ctx: ContextDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Job]:
    return ctx.store.list_jobs(limit)


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="One job: stage, progress, message, result or error",
    responses=error_responses(404),
)
def get_job(job_id: str, ctx: ContextDep) -> Job:
    return ctx.store.get_job(job_id)
