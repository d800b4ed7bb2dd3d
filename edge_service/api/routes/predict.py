"""``POST /v1/predict``: classify images with the deployed model, optionally Grad-CAM."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Query, Response, UploadFile

from edge_service.api.deps import ContextDep
from edge_service.services.predict import Upload
from fedinspect.service import error_responses
from fl_core.errors import InvalidInput
from fl_core.schemas import PredictResponse

router = APIRouter(prefix="/v1", tags=["predict"])


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify one or more images with the deployed model",
    description=(
        "Answers JSON: the label and per-class scores of each image; `heatmap=true` adds "
        "a Grad-CAM heat map of the predicted class over each image (base64 PNG, and the "
        "class it shows in `heatmap_class`). `format=png` (one image) answers the heat map "
        "itself as `image/png`, with the label in the `X-FedInspect-Label` header and "
        "the scores in `X-FedInspect-Scores` (JSON): "
        "`curl -F files=@cell.png '.../v1/predict?format=png' -o heatmap.png`."
    ),
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG with format=png"},
        **error_responses(400, 409, 413, 422),
    },
)
def predict(
    ctx: ContextDep,
    files: Annotated[list[UploadFile], File(description="one or more images")],
    heatmap: Annotated[
        bool, Query(description="add a Grad-CAM heat map (base64 PNG) per image")
    ] = False,
    format: Annotated[
        Literal["json", "png"],
        Query(description="png: answer the heat map of the one image sent, as image/png"),
    ] = "json",
) -> PredictResponse | Response:
    uploads = [Upload(f.filename or f"image{i}", f.file.read()) for i, f in enumerate(files)]
    if format == "json":
        return ctx.predictor.predict(uploads, heatmap=heatmap)
    if len(uploads) != 1:
        raise InvalidInput(f"format=png answers one heat map: send one image, not {len(uploads)}")
    answer = ctx.predictor.predict(uploads, heatmap=True)
    (scored,) = answer.predictions
    assert scored.heatmap_png_base64 is not None
    return Response(
        base64.b64decode(scored.heatmap_png_base64),
        media_type="image/png",
        headers={
            # class names are folder names: percent-encoded, as headers are latin-1
            "X-FedInspect-Label": quote(scored.label, safe=""),
            "X-FedInspect-Heatmap-Class": quote(scored.heatmap_class or scored.label, safe=""),
            "X-FedInspect-Scores": json.dumps(scored.scores, separators=(",", ":")),
            "X-FedInspect-Model-Version": str(answer.model_version),
        },
    )
