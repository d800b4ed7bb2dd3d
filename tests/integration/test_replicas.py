"""Failure tests of the scaled-out server with real processes on loopback: three
replicas on PostgreSQL and an S3 API server (moto) behind haproxy.

- edges run whole cycles while a replica is SIGKILLed and restarted every few seconds:
  no acknowledged upload lost, every cycle registered once, every edge gets the model;
- the replica that trains is killed mid-training: another finishes the cycle;
- PostgreSQL restarts mid-cycle: replicas answer 503 with Retry-After meanwhile and
  recover without a restart; the edges' retries carry them through.

Each prints the counts it checks.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.processes import wait_healthy
from tests.integration.replicas import Cluster
from tests.server_service.helpers import ADMIN, make_upload
from tests.services import PostgresServer, S3Server

pytestmark = pytest.mark.slow


@dataclass
class Ledger:
    """What the simulated edges were told, to check against what the servers hold."""

    acked: dict[tuple[int, str], str] = field(default_factory=dict)  # (cycle, edge) -> sha
    models: dict[str, list[int]] = field(default_factory=dict)  # edge -> versions got
    lock: threading.Lock = field(default_factory=threading.Lock)


def _register(cluster: Cluster, n: int) -> list[tuple[str, str]]:
    with cluster.admin() as admin:
        edges = []
        for i in range(n):
            body = admin.post("/v1/edges", json={"name": f"plant-{i}"}).json()
            edges.append((body["edge_id"], body["token"]))
    return edges


def _edge_cycle(
    cluster: Cluster, edge_id: str, token: str, seed: int, ledger: Ledger, timeout_s: float
) -> int:
    """One edge's cycle: request, upload, wait for the model, download it."""
    client = cluster.edge_client(token)
    try:
        cycle = client.create_cycle()
        body = make_upload(cycle.model_dump(mode="json"), edge_id, rows=16, seed=seed)
        ack = client.upload_features(cycle.id, body)
        assert ack.sha256 == hashlib.sha256(body).hexdigest()
        with ledger.lock:
            ledger.acked[(cycle.id, edge_id)] = ack.sha256
        deadline = time.monotonic() + timeout_s
        while True:
            got = client.get_cycle(cycle.id)
            if got.state.value in ("done", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"cycle {cycle.id} still {got.state.value}"
            time.sleep(0.2)
        assert got.state.value == "done", got.reason
        assert got.result_model_version is not None
        info = client.get_model(got.result_model_version)
        client.download_weights(info.version, info.sha256)  # sha256 checked
        with ledger.lock:
            ledger.models.setdefault(edge_id, []).append(info.version)
        return cycle.id
    finally:
        client.http.close()


def _run_cycles(
    cluster: Cluster,
    edges: list[tuple[str, str]],
    rounds: int,
    ledger: Ledger,
    more: Any = None,
    max_rounds: int = 1,
) -> list[int]:
    """``rounds`` cycles, and more (up to ``max_rounds``) while ``more()`` says so."""
    cycles: list[int] = []
    with ThreadPoolExecutor(len(edges)) as pool:
        r = 0
        while r < rounds or (more is not None and more() and r < max_rounds):
            futures = [
                pool.submit(_edge_cycle, cluster, e, t, 100 * r + i, ledger, 180.0)
                for i, (e, t) in enumerate(edges)
            ]
            ids = {f.result() for f in futures}
            assert len(ids) == 1, f"edges of round {r} ended in different cycles: {ids}"
            cycles.append(ids.pop())
            r += 1
    return cycles


def _check_stored(cluster: Cluster, ledger: Ledger, cycles: list[int]) -> dict[str, int]:
    """Every acknowledged upload is in its cycle and its blob in the bucket; each cycle
    registered one model version."""
    with cluster.admin() as admin:
        stored = 0
        for cycle_id in cycles:
            cycle = admin.get(f"/v1/cycles/{cycle_id}").json()
            held = {u["edge_id"]: u["sha256"] for u in cycle["uploads"]}
            for (c, edge_id), sha in ledger.acked.items():
                if c == cycle_id:
                    assert held.get(edge_id) == sha, (cycle_id, edge_id)
                    stored += 1
        models = admin.get("/v1/models").json()
    trained_from = [m["trained_from"]["cycle_id"] for m in models if m["trained_from"]]
    assert sorted(trained_from) == sorted(cycles), "a cycle registered no or several models"
    return {
        "uploads acknowledged": len(ledger.acked),
        "uploads stored": stored,
        "cycles trained": len(trained_from),
        "models registered": len(models) - 1,
    }


@pytest.fixture
def make_cluster(tmp_path: Path, postgres: PostgresServer, s3_server: S3Server) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(**env: str) -> Cluster:
        cluster = Cluster(tmp_path, postgres, s3_server, replicas=3, env=env)
        made.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop()


def _report(capsys: pytest.CaptureFixture[str], title: str, counts: dict[str, int]) -> None:
    with capsys.disabled():
        print(f"\n{title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def test_cycles_survive_replicas_killed_and_restarted(
    make_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    edges_n, rounds = 4, 3
    cluster: Cluster = make_cluster(FEDINSPECT_SERVER_MIN_EDGES=str(edges_n))
    edges = _register(cluster, edges_n)
    ledger = Ledger()
    stop = threading.Event()
    kills: list[str] = []

    def chaos() -> None:
        rng = random.Random(0)
        while not stop.wait(rng.uniform(1.0, 2.5)):
            name = rng.choice(sorted(cluster.ports))
            cluster.kill(name)
            kills.append(name)
            stop.wait(0.5)
            cluster.start_replica(name)

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    try:
        # at least three kills land during cycles: more rounds while fewer happened (a
        # round of small uploads can take under a second, a kill comes every 1.5-3 s)
        cycles = _run_cycles(
            cluster, edges, rounds, ledger, more=lambda: len(kills) < 3, max_rounds=60
        )
    finally:
        stop.set()
        killer.join(timeout=60)
    counts = _check_stored(cluster, ledger, cycles)
    counts["replicas killed"] = len(kills)
    counts["trainings started"] = len(cluster.events("cycle.training_started"))
    n = len(cycles)
    counts["cycles run"] = n
    _report(capsys, "replicas killed every few seconds", counts)
    assert len(kills) >= 3, "fewer than three replicas were killed during the cycles"
    assert counts["uploads acknowledged"] == counts["uploads stored"] == edges_n * n
    assert counts["cycles trained"] == counts["models registered"] == n
    assert counts["trainings started"] >= n
    assert all(len(v) == n for v in ledger.models.values()) and len(ledger.models) == edges_n


def test_the_training_replica_killed_mid_training_another_finishes(
    make_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Enough epochs that training lasts seconds: time to kill the replica doing it.
    cluster: Cluster = make_cluster(
        FEDINSPECT_SERVER_MIN_EDGES="2", FEDINSPECT_SERVER_TRAIN_EPOCHS="3000"
    )
    edges = _register(cluster, 2)
    ledger = Ledger()
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(_edge_cycle, cluster, e, t, i, ledger, 300.0)
            for i, (e, t) in enumerate(edges)
        ]
        deadline = time.monotonic() + 120
        while not cluster.events("cycle.training_started"):
            assert time.monotonic() < deadline, "no replica started training"
            assert not any(f.done() and f.exception() for f in futures)
            time.sleep(0.1)
        first = cluster.events("cycle.training_started")[0]["replica"]
        cluster.kill(first)
        cycle_ids = {f.result() for f in futures}
    (cycle_id,) = cycle_ids
    started = cluster.events("cycle.training_started")
    registered = [e for e in cluster.events("model.registered") if e.get("cycle_id")]
    counts = _check_stored(cluster, ledger, [cycle_id])
    counts["trainings started"] = len(started)
    _report(capsys, f"training replica {first} killed", counts)
    replicas = {e["replica"] for e in started}
    assert len(started) == 2 and first in replicas and len(replicas) == 2
    assert len(registered) == 1 and registered[0]["cycle_id"] == str(cycle_id)
    assert counts["cycles trained"] == 1


def test_postgres_restarted_mid_cycle(
    make_cluster: Any, postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster: Cluster = make_cluster(FEDINSPECT_SERVER_MIN_EDGES="3")
    edges = _register(cluster, 3)
    ledger = Ledger()
    statuses: list[int] = []
    with ThreadPoolExecutor(3) as pool:
        # Two edges upload before the database goes away; the third during the outage.
        early = [
            pool.submit(_edge_cycle, cluster, e, t, i, ledger, 300.0)
            for i, (e, t) in enumerate(edges[:2])
        ]
        deadline = time.monotonic() + 60
        while len(ledger.acked) < 2:
            assert time.monotonic() < deadline, "the first uploads were not acknowledged"
            time.sleep(0.1)
        postgres.stop("fast")
        try:
            with httpx.Client(base_url=cluster.url, timeout=30) as probe:
                for _ in range(6):  # round robin: every replica answers once or more
                    resp = probe.get("/v1/cycles", headers={"Authorization": "Bearer x"})
                    statuses.append(resp.status_code)
                    assert resp.status_code == 503, resp.text
                    assert resp.headers["Retry-After"] == "2"
                health = probe.get("/health").json()
                assert health["database"] == "unavailable" and health["blob_store"] == "ok"
            late = pool.submit(_edge_cycle, cluster, *edges[2], 2, ledger, 300.0)
            time.sleep(3)  # the late edge retries against 503s meanwhile
        finally:
            postgres.start()
        cycle_ids = {f.result() for f in [*early, late]}
    (cycle_id,) = cycle_ids
    counts = _check_stored(cluster, ledger, [cycle_id])
    counts["503 answers while down"] = statuses.count(503)
    _report(capsys, "PostgreSQL restarted mid-cycle", counts)
    assert counts["uploads acknowledged"] == counts["uploads stored"] == 3
    for name in cluster.ports:
        assert cluster.procs[name].proc.poll() is None, f"{name} did not survive"
        assert httpx.get(f"{cluster.replica_url(name)}/health").json()["database"] == "ok"


def test_two_replicas_one_state(
    tmp_path: Path,
    postgres: PostgresServer,
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An upload through the first replica; the first killed; training and download
    through the second; the first restarted sees the same state; no blob on disk."""
    # a quorum of two keeps the cycle collecting, for an operator to train it on r2
    cluster = Cluster(
        tmp_path, postgres, s3_server, replicas=2, env={"FEDINSPECT_SERVER_MIN_EDGES": "2"}
    )
    try:
        cluster.start()
        ((edge_id, token),) = _register(cluster, 1)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=cluster.replica_url("r1"), timeout=30) as r1:
            cycle = r1.post("/v1/cycles", headers=headers).json()
            body = make_upload(cycle, edge_id)
            put = r1.put(
                f"/v1/cycles/{cycle['id']}/features",
                content=body,
                headers={**headers, "Content-Type": "application/octet-stream"},
            )
            assert put.status_code == 201
        cluster.kill("r1")
        with httpx.Client(base_url=cluster.replica_url("r2"), timeout=30) as r2:
            train = r2.post(f"/v1/cycles/{cycle['id']}/train", headers=ADMIN)
            assert train.status_code == 200, train.text
            deadline = time.monotonic() + 120
            while (got := r2.get(f"/v1/cycles/{cycle['id']}", headers=headers).json())[
                "state"
            ] != "done":
                assert got["state"] in ("collecting", "training"), got
                assert time.monotonic() < deadline
                time.sleep(0.2)
            version = got["result_model_version"]
            weights = r2.get(f"/v1/models/{version}/weights", headers=headers)
            assert weights.status_code == 200
            seen_by_r2 = r2.get(f"/v1/cycles/{cycle['id']}", headers=headers).json()
        wait_healthy(cluster.replica_url("r1"), cluster.start_replica("r1"), timeout=120)
        with httpx.Client(base_url=cluster.replica_url("r1"), timeout=30) as r1:
            assert r1.get(f"/v1/cycles/{cycle['id']}", headers=headers).json() == seen_by_r2
            assert r1.get(f"/v1/models/{version}/weights", headers=headers).content == (
                weights.content
            )
        data_dir = tmp_path / "data"
        on_disk = [p for p in data_dir.rglob("*") if p.is_file()] if data_dir.exists() else []
        _report(
            capsys,
            "two replicas",
            {
                "uploads acknowledged": 1,
                "uploads stored": len(seen_by_r2["uploads"]),
                "blobs on local disk": len(on_disk),
            },
        )
        assert seen_by_r2["uploads"][0]["sha256"] == hashlib.sha256(body).hexdigest()
        assert on_disk == []
        started = cluster.events("cycle.training_started")
        assert [e["replica"] for e in started] == ["r2"]
    finally:
        cluster.stop()
