"""The API router: includes every resource router; all but ``/health`` need the admin
token, so the auth dependency is declared once here."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from edge_service.api.deps import require_admin
from edge_service.api.routes import health, jobs, metrics, models, predict, status

api_router = APIRouter()
api_router.include_router(health.router)

_protected = APIRouter(dependencies=[Depends(require_admin)])
for _module in (jobs, predict, models, status, metrics):
    _protected.include_router(_module.router)
api_router.include_router(_protected)

__all__ = ["api_router"]
