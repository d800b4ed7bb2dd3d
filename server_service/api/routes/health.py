"""``GET /health``: liveness, without auth (load balancers and compose probe it)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/health", summary="Liveness probe (no token needed)", response_model=Health)
def health() -> Health:
    return Health()
