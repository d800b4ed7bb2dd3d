"""SIGKILL a real server process at each point of a cycle and restart it on the same
DATA_DIR: while an upload is being received, right after one is acknowledged, during
training, and right after the new model is registered. The cycle reaches ``done``
with every acknowledged upload counted once, and every model's weights still hash to
their recorded sha256."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.procs import (
    HOST,
    SERVER_ADMIN_TOKEN,
    Service,
    Services,
    client,
    free_port,
    register_edge,
    services,
    wait_until,
)
from tests.server_service.helpers import make_upload


def _models_intact(url: str) -> list[dict[str, Any]]:
    with client(url, SERVER_ADMIN_TOKEN) as admin:
        models: list[dict[str, Any]] = admin.get("/v1/models").json()
        for model in models:
            weights = admin.get(f"/v1/models/{model['version']}/weights").content
            assert hashlib.sha256(weights).hexdigest() == model["sha256"], model["version"]
    return models


def _cycle(url: str, cycle_id: int) -> dict[str, Any]:
    with client(url, SERVER_ADMIN_TOKEN) as admin:
        cycle: dict[str, Any] = admin.get(f"/v1/cycles/{cycle_id}").json()
        return cycle


def _restart(procs: Services, old: Service, data_dir: Path, **o: str) -> Service:
    old.kill()
    return procs.server(data_dir, old.port, name=f"server-{len(procs.started)}", **o)


@pytest.mark.slow
def test_server_killed_at_each_point_of_a_cycle(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "server", free_port()
    slow = {"min_edges": "2", "cycle_deadline_s": "600", "train_epochs": "100000"}
    with services(tmp_path) as procs:
        server = procs.server(data_dir, port, **slow)
        a, b = register_edge(server.url, "line-a"), register_edge(server.url, "line-b")
        with client(server.url, a["token"]) as ca:
            cycle = ca.post("/v1/cycles").json()
        cycle_id = cycle["id"]
        body_a = make_upload(cycle, a["edge_id"], rows=12, seed=1)
        body_b = make_upload(cycle, b["edge_id"], rows=20, seed=2)

        # 1. Killed while B's upload is being received (half the body sent).
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.sendall(
            (
                f"PUT /v1/cycles/{cycle_id}/features HTTP/1.1\r\nHost: {HOST}\r\n"
                f"Authorization: Bearer {b['token']}\r\nContent-Length: {len(body_b)}\r\n\r\n"
            ).encode()
            + body_b[: len(body_b) // 2]
        )
        server = _restart(procs, server, data_dir, **slow)
        sock.close()
        after = _cycle(server.url, cycle_id)
        assert after["state"] == "collecting" and after["uploads"] == []

        # 2. Killed right after A's upload is acknowledged.
        with client(server.url, a["token"]) as ca:
            ack_a = ca.put(f"/v1/cycles/{cycle_id}/features", content=body_a)
        assert ack_a.status_code == 201
        server = _restart(procs, server, data_dir, **slow)
        (upload,) = _cycle(server.url, cycle_id)["uploads"]
        assert upload["sha256"] == ack_a.json()["sha256"] and upload["rows"] == 12

        # 3. B's upload meets the quorum: killed during (deliberately long) training.
        with client(server.url, b["token"]) as cb:
            ack_b = cb.put(f"/v1/cycles/{cycle_id}/features", content=body_b)
        assert ack_b.status_code == 201
        wait_until(lambda: _cycle(server.url, cycle_id)["state"] == "training", 30, "training")
        # The restart trains with few epochs, so that this test ends soon.
        fast = {**slow, "train_epochs": "2"}
        server = _restart(procs, server, data_dir, **fast)
        wait_until(lambda: _cycle(server.url, cycle_id)["state"] == "done", 120, "done")

        # 4. Killed right after the new model was registered.
        server = _restart(procs, server, data_dir, **fast)
        done = _cycle(server.url, cycle_id)
        models = _models_intact(server.url)
        with client(server.url, a["token"]) as ca:
            again = ca.put(f"/v1/cycles/{cycle_id}/features", content=body_a)

    assert done["state"] == "done" and done["result_model_version"] == 2
    assert sorted((u["edge_id"], u["rows"]) for u in done["uploads"]) == sorted(
        [(a["edge_id"], 12), (b["edge_id"], 20)]
    )
    model = next(m for m in models if m["version"] == 2)
    # Each acknowledged upload counted once in the training.
    assert model["trained_from"]["rows_per_edge"] == {a["edge_id"]: 12, b["edge_id"]: 20}
    assert [m["version"] for m in models] == [1, 2]
    assert again.status_code == 200 and again.json()["unchanged"] is True
