"""Local models: list, activate (rollback), download the deployed one as ONNX, and the
latest evaluation and gate decision."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

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
    "/models/deployed/onnx",
    response_class=Response,
    summary="The deployed model as an ONNX file, to run in a line's own runtime",
    description=(
        "The whole deployed model (normalisation, backbone, classifier with its class "
        "prior), exported once per deployment and checked against torch: the file this "
        "edge itself serves `POST /v1/predict` with. Input `images` [B, 3, S, S] float32 "
        "in [0, 1] (grey images repeated on the three channels), resized to S x S as the "
        "edge does; outputs `logits` and `probabilities` [B, classes]. The class names "
        "(JSON), input size S and architecture are in the file's metadata "
        "(`fedinspect.class_names`, `fedinspect.input_size`, `fedinspect.arch`) and the "
        "model in the `X-FedInspect-Model-Id` and `X-FedInspect-Model-Version` headers. "
        "`curl -H 'Authorization: Bearer ...' .../v1/models/deployed/onnx -o model.onnx`."
    ),
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The ONNX file",
        },
        **error_responses(404, 409),
    },
)
def deployed_onnx(ctx: ContextDep) -> Response:
    local, data = ctx.deployed.onnx()
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="fedinspect-model-{local.id}.onnx"',
            "X-FedInspect-Model-Id": str(local.id),
            "X-FedInspect-Model-Version": str(local.base_version),
        },
    )


@router.get(
    "/evaluation",
    response_model=Evaluation,
    summary="The deployed and previous models, and the last decision: the deploy gate's "
    "choice on the validation split (with each model's accuracy and the majority-class "
    "baseline), or an operator's activation",
)
def evaluation(ctx: ContextDep) -> Evaluation:
    return ctx.registry.evaluation()
