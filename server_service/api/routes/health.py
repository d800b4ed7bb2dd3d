"""``GET /health``: liveness, without auth (load balancers and compose probe it).

It answers 200 whenever the process serves requests, and says which replica answered
and whether that replica reaches the database and the blob store at this moment.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import text

from server_service.api.deps import RuntimeDep

router = APIRouter(tags=["health"])

Reach = Literal["ok", "unavailable"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    replica: str = Field(description="REPLICA_ID of the server process that answered")
    database: Reach = Field(description="whether this replica reaches its database now")
    blob_store: Reach = Field(description="whether this replica reaches its blob store now")


@router.get("/health", summary="Liveness probe (no token needed)", response_model=Health)
def health(rt: RuntimeDep) -> Health:
    database: Reach = "ok"
    blob_store: Reach = "ok"
    try:
        with rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        database = "unavailable"
    try:
        rt.blobs.check()
    except Exception:
        blob_store = "unavailable"
    return Health(replica=rt.replica_id, database=database, blob_store=blob_store)
