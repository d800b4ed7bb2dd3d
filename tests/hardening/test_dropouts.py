"""Dropouts and partitions against a real server process.

- Three edges join a cycle with MIN_EDGES=2; one dies after joining (it never
  uploads): the cycle trains at its deadline with the two uploads.
- Every edge dies after joining: the cycle fails at its deadline, with a reason.
  (These edges are HTTP clients speaking the edge's protocol: what is under test is
  the server's quorum and deadline handling, and a dead edge sends nothing.)
- A real edge process loses the server for 30 s in the middle of its cycle job (the
  server is stopped, then restarted on the same port and DATA_DIR): the job's retries
  carry it over the outage and it succeeds. Both services log at DEBUG throughout, and
  no piece of any token (including ones presented and refused) appears in their logs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.procs import (
    EDGE_ADMIN_TOKEN,
    SERVER_ADMIN_TOKEN,
    client,
    edge_env,
    free_port,
    register_edge,
    services,
    wait_until,
)
from tests.server_service.helpers import make_upload

OUTAGE_S = 30.0


def _state(url: str, cycle_id: int) -> dict[str, Any]:
    with client(url, SERVER_ADMIN_TOKEN) as admin:
        cycle: dict[str, Any] = admin.get(f"/v1/cycles/{cycle_id}").json()
        return cycle


@pytest.mark.slow
def test_deadline_trains_with_the_quorum_or_fails_without_it(tmp_path: Path) -> None:
    port = free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", port, min_edges="2", cycle_deadline_s="6")
        edges = [register_edge(server.url, f"line-{i}") for i in range(3)]
        # Three join; two upload; the third dies after joining.
        cycles = []
        for e in edges:
            with client(server.url, e["token"]) as c:
                cycles.append(c.post("/v1/cycles").json())
        cycle = cycles[0]
        assert {c["id"] for c in cycles} == {cycle["id"]}
        for i, e in enumerate(edges[:2]):
            with client(server.url, e["token"]) as c:
                body = make_upload(cycle, e["edge_id"], rows=10, seed=i)
                assert c.put(f"/v1/cycles/{cycle['id']}/features", content=body).status_code == 201
        # The dead edge is still awaited until the deadline.
        assert _state(server.url, cycle["id"])["state"] == "collecting"
        wait_until(lambda: _state(server.url, cycle["id"])["state"] == "done", 90, "done")
        done = _state(server.url, cycle["id"])
        assert sorted(u["edge_id"] for u in done["uploads"]) == sorted(
            e["edge_id"] for e in edges[:2]
        )
        assert len(done["joined_edges"]) == 3

        # All edges die after joining the next cycle.
        for e in edges:
            with client(server.url, e["token"]) as c:
                second = c.post("/v1/cycles").json()
        assert second["id"] != cycle["id"]
        wait_until(lambda: _state(server.url, second["id"])["state"] == "failed", 60, "failed")
        failed = _state(server.url, second["id"])
    assert failed["reason"] == "deadline passed with 0 upload(s); 2 needed"


@pytest.mark.slow
def test_edge_job_survives_a_30_second_server_outage(tmp_path: Path, image_folder: Path) -> None:
    server_port, edge_port = free_port(), free_port()
    data_dir = tmp_path / "server"
    settings = {"min_edges": "2", "cycle_deadline_s": "600", "log_level": "DEBUG"}
    with services(tmp_path) as procs:
        server = procs.server(data_dir, server_port, **settings)
        reg, other = register_edge(server.url, "line-a"), register_edge(server.url, "line-b")
        env = edge_env(
            tmp_path / "edge",
            edge_port,
            server.url,
            reg["token"],
            reg["edge_id"],
            image_folder,
            retry_budget_s="120",
            retry_max_s="3",
            log_level="DEBUG",
        )
        edge = procs.edge("edge", edge_port, env)
        with client(edge.url, EDGE_ADMIN_TOKEN) as c:
            job = c.post("/v1/jobs/cycle").json()

            def job_state() -> dict[str, Any]:
                state: dict[str, Any] = c.get(f"/v1/jobs/{job['id']}").json()
                return state

            # The edge uploaded and now waits for a second edge (quorum of two).
            wait_until(lambda: job_state()["stage"] == "wait", 120, "the wait stage")
            server.stop()
            outage_started = time.monotonic()
            time.sleep(OUTAGE_S)
            assert job_state()["state"] == "running"  # still retrying, not failed
            server = procs.server(data_dir, server_port, name="server-restarted", **settings)
            outage = time.monotonic() - outage_started
            with client(server.url, other["token"]) as c2:
                cycle = c2.post("/v1/cycles").json()
                body = make_upload(cycle, other["edge_id"], rows=10, seed=9)
                assert c2.put(f"/v1/cycles/{cycle['id']}/features", content=body).status_code == 201
            wait_until(lambda: job_state()["state"] != "running", 180, "the job to end")
            final = job_state()
            assert final["state"] == "done", f"{final}\n{procs.logs()}"
            guessed = {"Authorization": "Bearer guessed-token-123456"}
            assert c.get("/v1/status", headers=guessed).status_code == 401
        with client(server.url, "guessed-token-abcdef") as bad:
            assert bad.get("/v1/cycles").status_code == 401
        logs = procs.logs(chars=10**8)
    assert outage >= OUTAGE_S
    assert final["result"]["cycle_id"] == cycle["id"]
    assert final["result"]["model_version"] == 2
    assert "event=cycle.done" in logs and re.search(r"event=job.done job=\S+", logs)
    secrets = (SERVER_ADMIN_TOKEN, reg["token"], other["token"], EDGE_ADMIN_TOKEN, "guessed-token")
    for secret in secrets:
        # Any 12-character piece of a token would be a leak, not just the whole token.
        pieces = {secret[i : i + 12] for i in range(max(1, len(secret) - 11))}
        assert not [p for p in pieces if p in logs], f"token material of {secret[:4]}... logged"
