"""Admission control: past its bound a request gets 503 with Retry-After, /health never
does, and every route but /health documents the 503 in the OpenAPI schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from starlette.types import Receive, Scope, Send

from fedinspect.guards import AdmissionControl
from server_service.main import create_app
from tests.server_service.helpers import make_settings


def test_over_the_bound_is_503_with_retry_after() -> None:
    async def scenario() -> list[httpx.Response]:
        release = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        guarded = AdmissionControl(app, max_requests=2, max_uploads=1, wait_s=0.05)
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.create_task(c.put("/v1/cycles/1/features", content=b"x"))
            second = asyncio.create_task(c.get("/v1/cycles"))
            await asyncio.sleep(0.01)
            refused_upload = await c.put("/v1/cycles/1/features", content=b"y")
            refused_request = await c.get("/v1/models")
            health_task = asyncio.create_task(c.get("/health"))
            await asyncio.sleep(0.01)
            release.set()
            return [refused_upload, refused_request, await first, await second, await health_task]

    upload, request, first, second, health = asyncio.run(scenario())
    assert upload.status_code == 503 and upload.headers["Retry-After"] == "1"
    assert upload.json() == {"detail": "server busy: too many concurrent uploads; retry later"}
    assert request.status_code == 503 and request.headers["Retry-After"] == "1"
    assert request.json() == {"detail": "server busy: too many concurrent requests; retry later"}
    assert first.status_code == second.status_code == health.status_code == 200


def test_every_route_but_health_documents_the_503(tmp_path: Path) -> None:
    paths = create_app(make_settings(tmp_path / "s")).openapi()["paths"]
    for path, item in paths.items():
        for method, op in item.items():
            documented = "503" in op["responses"]
            assert documented == (path != "/health"), (method, path)
            if documented:
                assert "Retry-After" in op["responses"]["503"]["headers"]
