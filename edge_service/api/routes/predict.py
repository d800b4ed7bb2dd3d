"""``POST /v1/predict``: classify images with the deployed model, optionally Grad-CAM."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from edge_service.api.deps import ContextDep, error_responses
from edge_service.services.predict import Upload
from fl_core.schemas import PredictResponse

router = APIRouter(prefix="/v1", tags=["predict"])


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify one or more images with the deployed model",
    responses=error_responses(400, 409, 413, 422),
)
def predict(
    ctx: ContextDep,
    files: Annotated[list[UploadFile], File(description="one or more images")],
    heatmap: Annotated[
        bool, Query(description="add a Grad-CAM heat map (base64 PNG) per image")
    ] = False,
) -> PredictResponse:
    uploads = [Upload(f.filename or f"image{i}", f.file.read()) for i, f in enumerate(files)]
    return ctx.predictor.predict(uploads, heatmap=heatmap)
