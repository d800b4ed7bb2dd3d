"""``GET /health``: liveness, the only route without auth."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

import fl_core

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


@router.get("/health", response_model=Health, summary="Liveness check (no auth)")
def health() -> Health:
    return Health(version=fl_core.__version__)
