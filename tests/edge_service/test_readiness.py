"""What an operator sees before and while a job runs: /v1/status and the start-up log
name what will stop a cycle (server unreachable, token refused, dataset missing), a
waiting job says what it waits for and until when, and a finished job is "done"."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from edge_service.services.cycle import waiting_message
from fl_core.schemas import Cycle, CycleState, RoundPlan, UploadInfo
from tests.edge_service.conftest import AUTH, EdgeFactory, TestClient, wait_job
from tests.edge_service.fakes import FakeServer


def _unreachable(_request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused")


def test_status_names_an_unreachable_server_and_a_missing_dataset(
    make_edge: EdgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = httpx.Client(transport=httpx.MockTransport(_unreachable), base_url="http://server.test")
    with caplog.at_level(logging.WARNING, logger="edge_service"):
        edge = make_edge(down, dataset=tmp_path / "no-such-folder")
    # the start-up log says it at once, before any job runs
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "event=not_ready" in logged and "cannot reach the server" in logged
    assert "no-such-folder" in logged

    status = edge.get("/v1/status", headers=AUTH).json()
    assert status["server"]["reachable"] is False
    assert status["dataset"] is None
    server_problem, data_problem = status["problems"]
    assert server_problem.startswith("cannot reach the server at http://server.test")
    assert data_problem.startswith(f"dataset '{tmp_path / 'no-such-folder'}' cannot be loaded")
    # /health stays a liveness probe
    assert edge.get("/health").status_code == 200
    down.close()


def test_status_names_a_refused_token(make_edge: EdgeFactory) -> None:
    refusing = httpx.Client(
        transport=httpx.MockTransport(
            lambda _r: httpx.Response(401, json={"detail": "invalid or revoked token"})
        ),
        base_url="http://server.test",
    )
    edge = make_edge(refusing)
    status = edge.get("/v1/status", headers=AUTH).json()
    assert status["server"] == {
        "url": "http://server.test",
        "reachable": True,
        "authorized": False,
        "detail": "the server refused this edge's token (401: invalid or revoked token): "
        "check FEDINSPECT_EDGE_TOKEN",
    }
    assert status["problems"] == [status["server"]["detail"]]
    refusing.close()


def test_a_ready_edge_has_no_problem_and_a_done_job_no_stage(
    edge: TestClient, fake_server: FakeServer
) -> None:
    status = edge.get("/v1/status", headers=AUTH).json()
    assert status["problems"] == [] and status["server"]["authorized"] is True
    done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])
    assert (done["state"], done["stage"], done["progress"]) == ("done", "done", 1.0)


def _cycle(state: CycleState, uploads: int, deadline: datetime) -> Cycle:
    now = datetime.now(UTC)
    return Cycle.model_construct(
        id=3,
        state=state,
        min_edges=2,
        deadline=deadline,
        created_at=now,
        updated_at=now,
        joined_edges=["a", "b"],
        uploads=[
            UploadInfo(edge_id=f"e{i}", rows=1, sha256="0" * 64, size=1, received_at=now)
            for i in range(uploads)
        ],
    )


def test_a_waiting_job_says_what_it_waits_for_and_until_when() -> None:
    now = datetime(2026, 1, 2, 10, 0, 0, tzinfo=UTC)
    collecting = _cycle(CycleState.collecting, 1, now + timedelta(seconds=570))
    assert waiting_message(collecting, now) == (
        "waiting for cycle 3 (collecting): 1/2 uploads, the server trains when 2 edges have "
        "uploaded or at the deadline; waiting until its deadline 2026-01-02 10:09:30 UTC "
        "(in 9m 30s); an operator can train now with POST /v1/cycles/3/train on the server"
    )
    late = waiting_message(_cycle(CycleState.collecting, 1, now - timedelta(seconds=5)), now)
    assert "its deadline 2026-01-02 09:59:55 UTC passed 5s ago" in late
    training = waiting_message(_cycle(CycleState.training, 2, now), now)
    assert training == "waiting for cycle 3 (training): the server is training on 2 uploads"
    in_rounds = _cycle(CycleState.rounds, 2, now + timedelta(seconds=900)).model_copy(
        update={
            "round": 1,
            "round_deadline": now + timedelta(seconds=90),
            "plan": RoundPlan.model_construct(rounds=3),
        }
    )
    assert waiting_message(in_rounds, now) == (
        "waiting for cycle 3 (rounds): round 1/3 has 0/2 updates; it is aggregated when "
        "every edge has sent its update, or at its deadline 2026-01-02 10:01:30 UTC (in "
        "1m 30s) if 2 have (MIN_EDGES); otherwise the cycle ends with the last round's model"
    )


def test_the_edge_page_is_served_offline(edge: TestClient) -> None:
    page = edge.get("/ui")
    assert page.status_code == 200
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
    assert "/ui/assets/edge.js" in page.text
    assert edge.get("/ui/assets/edge.js").status_code == 200
    assert "/ui/common/common.js" in page.text
    assert edge.get("/ui/common/common.js").status_code == 200
    for docs in ("/docs", "/redoc"):
        assert "/docs-assets/" in edge.get(docs).text
