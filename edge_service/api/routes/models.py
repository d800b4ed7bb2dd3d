"""Local models: list, activate (rollback), and the latest evaluation and gate decision."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from edge_service.api.deps import ContextDep
from fedinspect.service import MAX_ID, error_responses
from fl_core.schemas import Evaluation, LocalModel

router = APIRouter(prefix="/v1", tags=["models"])

LocalModelId = Annotated[int, Path(ge=1, le=MAX_ID, description="local model id")]


@router.get(
    "/models",
    response_model=list[LocalModel],
    summary="Local models, oldest first",
)
def list_models(ctx: ContextDep) -> list[LocalModel]:
    return ctx.registry.all_models()


@router.post(
    "/models/{model_id}/activate",
    response_model=LocalModel,
    summary="Deploy a recorded local model (rollback or roll forward)",
    responses=error_responses(404, 409, 422),
)
def activate_model(model_id: LocalModelId, ctx: ContextDep) -> LocalModel:
    return ctx.registry.activate(model_id)


@router.get(
    "/evaluation",
    response_model=Evaluation,
    summary="The deployed and previous models, and the last decision: the deploy gate's "
    "choice on the validation split (with each model's accuracy and the majority-class "
    "baseline), or an operator's activation",
)
def evaluation(ctx: ContextDep) -> Evaluation:
    return ctx.registry.evaluation()
