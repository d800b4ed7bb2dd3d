"""Admission control: a bound on the requests (and feature uploads) handled at once.

Past the bound a request waits up to ``admission_wait_s`` for a slot, then gets
``503 Service Unavailable`` with ``Retry-After`` instead of queueing without end. That
keeps a burst of edges from exhausting the worker threads and database connections
(every request would then time out), and bounds the memory that upload bodies take:
at most ``max_concurrent_uploads`` bodies are buffered at a time. ``/health`` is never
refused, so probes keep working under load. Edges retry 503 after ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import math

from starlette.types import ASGIApp, Receive, Scope, Send

from fl_core.schemas import ErrorResponse

#: paths admitted without a slot (liveness probes)
EXEMPT = frozenset({"/health"})

BUSY_RESPONSES: dict[int | str, dict[str, object]] = {
    503: {
        "model": ErrorResponse,
        "description": "the server is at its limit of concurrent requests or uploads; "
        "retry after the number of seconds in Retry-After",
        "headers": {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer"},
            }
        },
    }
}


class AdmissionControl:
    """ASGI middleware bounding concurrent requests, and concurrent uploads (PUT)."""

    def __init__(
        self,
        app: ASGIApp,
        max_requests: int,
        max_uploads: int,
        wait_s: float,
        retry_after_s: float = 1.0,
    ) -> None:
        self.app = app
        self.requests = asyncio.Semaphore(max_requests)
        self.uploads = asyncio.Semaphore(max_uploads)
        self.wait_s = wait_s
        self.retry_after = str(max(1, math.ceil(retry_after_s)))

    async def _acquire(self, slots: asyncio.Semaphore) -> bool:
        try:
            await asyncio.wait_for(slots.acquire(), timeout=self.wait_s)
        except TimeoutError:
            return False
        return True

    async def _busy(self, send: Send, what: str) -> None:
        body = json.dumps(
            {"detail": f"server busy: too many concurrent {what}; retry later"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", self.retry_after.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "PUT"
        if upload and not await self._acquire(self.uploads):
            await self._busy(send, "uploads")
            return
        try:
            if not await self._acquire(self.requests):
                await self._busy(send, "requests")
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self.requests.release()
        finally:
            if upload:
                self.uploads.release()


__all__ = ["BUSY_RESPONSES", "EXEMPT", "AdmissionControl"]
