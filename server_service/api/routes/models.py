"""``/v1/models``: the model registry and its weights (edge or admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from fedinspect.service import BUSY_RESPONSES, Responses, error_responses
from fl_core.schemas import ModelInfo, ModelManifest, TensorSubset
from server_service.api.deps import (
    AUTH_ERRORS,
    EdgeOrAdminDep,
    ModelVersion,
    RuntimeDep,
    SessionDep,
)
from server_service.services import models

router = APIRouter(prefix="/v1/models", tags=["models"])

_SAFETENSORS = "application/octet-stream"
#: the OpenAPI content of a safetensors answer
_BINARY = {_SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}}
#: routes that read stored bytes also answer 503 when those no longer hash to their sha256
_CORRUPT: Responses = {
    503: BUSY_RESPONSES[503]
    | {
        "description": BUSY_RESPONSES[503]["description"]
        + "; or the stored bytes are corrupt (their sha256 no longer matches)"
    }
}


@router.get(
    "",
    summary="List model versions, oldest first",
    response_model=list[ModelInfo],
    responses=AUTH_ERRORS,
)
def list_models(session: SessionDep, _caller: EdgeOrAdminDep) -> list[ModelInfo]:
    return models.list_models(session)


# Declared before /{version} so that "latest" is not parsed as a version number.
@router.get(
    "/latest",
    summary="The newest model version (the base of the next cycle)",
    response_model=ModelInfo,
    responses=error_responses(404, base=AUTH_ERRORS),
)
def latest_model(session: SessionDep, _caller: EdgeOrAdminDep) -> ModelInfo:
    return models.to_info(models.latest_model(session))


@router.get(
    "/{version}",
    summary="One model version's metadata",
    response_model=ModelInfo,
    responses=error_responses(404, 422, base=AUTH_ERRORS),
)
def get_model(version: ModelVersion, session: SessionDep, _caller: EdgeOrAdminDep) -> ModelInfo:
    return models.to_info(models.get_model(session, version))


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


@router.get(
    "/{version}/weights",
    summary="A model version's weights (safetensors); ETag is the quoted sha256",
    response_class=Response,
    response_model=None,
    responses={
        200: {
            "content": _BINARY,
            "description": "safetensors bytes",
        },
        304: {"description": "If-None-Match matched: the caller has these weights"},
        **error_responses(404, 422, base=AUTH_ERRORS),
        **_CORRUPT,
    },
)
def get_weights(
    version: ModelVersion,
    request: Request,
    rt: RuntimeDep,
    session: SessionDep,
    _caller: EdgeOrAdminDep,
) -> Response:
    row = models.get_model(session, version)
    etag = f'"{row.sha256}"'
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    path = models.verified_weights_path(rt, row)
    if path is None:  # a remote store (S3): the bytes, their sha256 checked on the way
        return Response(
            models.weights_bytes(rt, row),
            media_type=_SAFETENSORS,
            headers={
                "ETag": etag,
                "Content-Disposition": f'attachment; filename="model-v{row.version}.safetensors"',
            },
        )
    return FileResponse(
        path,
        media_type=_SAFETENSORS,
        filename=f"model-v{row.version}.safetensors",
        headers={"ETag": etag},
    )


@router.get(
    "/{version}/manifest",
    summary="Per-tensor sha256s of a model version's weights (to fetch only what changed)",
    response_model=ModelManifest,
    responses={**error_responses(404, 422, base=AUTH_ERRORS), **_CORRUPT},
)
def get_manifest(
    version: ModelVersion, rt: RuntimeDep, session: SessionDep, _caller: EdgeOrAdminDep
) -> ModelManifest:
    return models.manifest(rt, models.get_model(session, version))


@router.get(
    "/{version}/update",
    summary="A federated round's averaged update (safetensors in the round's dtype): its "
    "parent's weights plus these tensors are this version's weights, to the bit",
    response_class=Response,
    response_model=None,
    responses={
        200: {
            "content": _BINARY,
            "description": "safetensors bytes; the manifest's `update` gives their sha256 "
            "and the parent they apply to",
        },
        **error_responses(404, 422, base=AUTH_ERRORS),
        **_CORRUPT,
    },
)
def get_update(
    version: ModelVersion, rt: RuntimeDep, session: SessionDep, _caller: EdgeOrAdminDep
) -> Response:
    row = models.get_model(session, version)
    return Response(models.update_bytes(rt, row), media_type=_SAFETENSORS)


@router.post(
    "/{version}/weights/subset",
    summary="Some tensors of a model version's weights (safetensors, with the full "
    "file's metadata); the caller rebuilds the full file and checks its sha256",
    response_class=Response,
    response_model=None,
    responses={
        200: {
            "content": _BINARY,
            "description": "safetensors bytes holding exactly the named tensors",
        },
        # 400: a body that is not JSON at all (FastAPI's own answer)
        **error_responses(400, 404, 413, 422, base=AUTH_ERRORS),
        **_CORRUPT,
    },
)
def get_weights_subset(
    version: ModelVersion,
    body: TensorSubset,
    rt: RuntimeDep,
    session: SessionDep,
    _caller: EdgeOrAdminDep,
) -> Response:
    row = models.get_model(session, version)
    return Response(models.weights_subset(rt, row, body.names), media_type=_SAFETENSORS)
