"""Includes every router; nothing else."""

from __future__ import annotations

from fastapi import APIRouter

from server_service.api.routes import cycles, edges, health, metrics, models

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(metrics.router)
api_router.include_router(edges.router)
api_router.include_router(cycles.router)
api_router.include_router(models.router)

__all__ = ["api_router"]
