"""Schema fuzzing (schemathesis) of both services, in-process, with valid tokens.

At least 1,000 generated requests per service; no answer may be a 5xx and every answer
must conform to the service's OpenAPI schema (status code, content type, headers,
body). Generation is derandomized, so a run is reproducible and bounded in time.

The edge's job routes are fuzzed too: its server client is a fake that refuses every
request at once (401, which the edge does not retry), so a started job fails within
milliseconds instead of running a cycle. A tiny model is deployed first so that
``/v1/predict`` reaches image decoding rather than stopping at "no model".
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from edge_service.main import create_app as create_edge_app
from server_service.main import create_app as create_server_app
from tests.edge_service.conftest import ADMIN_TOKEN as EDGE_ADMIN_TOKEN
from tests.edge_service.conftest import deploy_model, tiny_model
from tests.edge_service.conftest import make_settings as make_edge_settings
from tests.hardening.fuzz import FuzzReport, fuzz_app
from tests.server_service.helpers import ADMIN, TestClient, make_settings

MIN_REQUESTS = 1000
#: cases per operation and pass; the server has more parameterised routes than the edge
EXAMPLES_PER_PASS = {"server": 35, "edge": 60}


def _check(report: FuzzReport, service: str, out: Path) -> None:
    summary = {
        "service": service,
        "requests": report.requests,
        "statuses": dict(sorted(report.statuses.items())),
        "failures": report.failures,
    }
    out.write_text(json.dumps(summary, indent=2))
    print(f"\n{service} fuzzing: {report.requests} requests, statuses {summary['statuses']}")
    assert not report.failures, "\n\n".join(f"{k}:\n{v}" for k, v in report.failures.items())
    assert 500 not in report.statuses
    assert report.requests >= MIN_REQUESTS


@pytest.mark.slow
def test_fuzz_server(tmp_path: Path) -> None:
    app = create_server_app(make_settings(tmp_path / "server", cycle_deadline_s=3600))
    with TestClient(app) as client:
        reg = client.post("/v1/edges", json={"name": "fuzz-edge"}, headers=ADMIN).json()
        edge_only = {
            (method.upper(), path)
            for path, item in app.openapi()["paths"].items()
            for method, op in item.items()
            if "admin token on an edge route" in str(op.get("responses", {}).get("403", {}))
        }
        assert ("PUT", "/v1/cycles/{cycle_id}/features") in edge_only

        def token_for(method: str, path: str) -> str:
            if (method, path) in edge_only:
                return str(reg["token"])
            return ADMIN["Authorization"].removeprefix("Bearer ")

        report = fuzz_app(app, token_for, EXAMPLES_PER_PASS["server"])
    _check(report, "server", tmp_path / "fuzz-server.json")


@pytest.mark.slow
def test_fuzz_edge(tmp_path: Path, image_folder: Path) -> None:
    refusing = httpx.Client(
        transport=httpx.MockTransport(
            lambda _request: httpx.Response(401, json={"detail": "fuzzing: refused"})
        ),
        base_url="http://server.invalid",
    )
    app = create_edge_app(make_edge_settings(tmp_path / "edge", image_folder), refusing)
    with TestClient(app) as client:
        ctx = app.state.ctx
        deploy_model(ctx, tiny_model(2))
        report = fuzz_app(app, lambda _m, _p: EDGE_ADMIN_TOKEN, EXAMPLES_PER_PASS["edge"])
        ctx.runner.wait_idle(30)
        assert client.get("/health").status_code == 200
    refusing.close()
    _check(report, "edge", tmp_path / "fuzz-edge.json")
