"""Includes every router, and documents the admission-control 503 on each but /health."""

from __future__ import annotations

from fastapi import APIRouter

from fedinspect.service import BUSY_RESPONSES
from server_service.api.routes import cycles, edges, fleet, health, metrics, models

api_router = APIRouter()
api_router.include_router(health.router)
# Every route but /health is under admission control: each may answer 503 (busy).
for _module in (metrics, edges, cycles, models, fleet):
    api_router.include_router(_module.router, responses=BUSY_RESPONSES)

__all__ = ["api_router"]
