"""The API router: includes every resource router; all but ``/health`` need the admin
token and are under admission control, so the auth dependency, its 401 and the busy
503 are declared once here."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from edge_service.api.deps import ADMIN_ERRORS, require_admin
from edge_service.api.routes import health, jobs, metrics, models, predict, status
from fedinspect.service import BUSY_RESPONSES

api_router = APIRouter()
api_router.include_router(health.router)

_protected = APIRouter(
    dependencies=[Depends(require_admin)], responses={**ADMIN_ERRORS, **BUSY_RESPONSES}
)
for _module in (jobs, predict, models, status, metrics):
    _protected.include_router(_module.router)
api_router.include_router(_protected)

__all__ = ["api_router"]
