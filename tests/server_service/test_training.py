"""Server-side training: quorum, deadlines, failures, cancellation, responsiveness,
and resuming a cycle left in ``training`` by a dead process."""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.exc import OperationalError

from fl_core.schemas import CycleState
from fl_core.training import TrainReport
from server_service.db import CycleRow
from server_service.services import cycle_state, training
from tests.server_service.conftest import EdgeFactory
from tests.server_service.helpers import (
    ADMIN,
    Edge,
    TestClient,
    make_settings,
    make_upload,
    put_features,
    running,
    wait_for_state,
)


def test_quorum_trains_the_next_model_version(data_dir: Path) -> None:
    with running(make_settings(data_dir, min_edges=2)) as client:
        a, b = (_register(client, n) for n in ("a", "b"))
        cycle = client.post("/v1/cycles", headers=a.headers).json()
        assert cycle["min_edges"] == 2
        put_features(client, cycle["id"], a, make_upload(cycle, a.edge_id, rows=12, seed=1))
        time.sleep(0.2)  # a few watcher passes: one upload is below the quorum
        assert client.get(f"/v1/cycles/{cycle['id']}", headers=ADMIN).json()["state"] == (
            "collecting"
        )
        put_features(client, cycle["id"], b, make_upload(cycle, b.edge_id, rows=8, seed=2))
        done = wait_for_state(client, cycle["id"], {"done", "failed"})
        assert done["state"] == "done", done["reason"]
        assert done["result_model_version"] == 2
        assert done["metrics"]["n"] > 0
        model = client.get("/v1/models/2", headers=ADMIN).json()
        assert model["parent"] == 1
        assert model["metrics"] == done["metrics"]
        assert model["privacy"] == cycle["spec"]["privacy"]
        trained = model["trained_from"]
        assert trained["cycle_id"] == cycle["id"]
        assert sorted(trained["edges"]) == sorted([a.edge_id, b.edge_id])
        assert trained["rows_per_edge"] == {a.edge_id: 12, b.edge_id: 8}
        assert trained["rows_train"] + trained["rows_val"] == 20
        assert trained["rows_val"] > 0
        assert client.get("/v1/models/latest", headers=ADMIN).json()["version"] == 2
        # The next cycle starts from the new model.
        nxt = client.post("/v1/cycles", headers=a.headers).json()
        assert nxt["base_model_version"] == 2
        assert nxt["spec"]["base_model_sha256"] == model["sha256"]
        text = client.get("/metrics", headers=ADMIN).text
        assert "fedinspect_server_training_seconds_count 1.0" in text
        assert 'fedinspect_server_cycles{state="done"} 1.0' in text


def _register(client: TestClient, name: str) -> Edge:
    body = client.post("/v1/edges", json={"name": name}, headers=ADMIN).json()
    return Edge(edge_id=body["edge_id"], name=body["name"], token=body["token"])


def test_deadline_without_quorum_fails(data_dir: Path) -> None:
    with running(make_settings(data_dir, min_edges=2, cycle_deadline_s=0.3)) as client:
        a = _register(client, "a")
        cycle = client.post("/v1/cycles", headers=a.headers).json()
        put_features(client, cycle["id"], a, make_upload(cycle, a.edge_id))
        failed = wait_for_state(client, cycle["id"], {"failed", "done"}, timeout_s=10)
        assert failed["state"] == "failed"
        assert failed["reason"] == "deadline passed with 1 upload(s); 2 needed"
        assert failed["result_model_version"] is None


def test_deadline_with_quorum_trains(data_dir: Path) -> None:
    with running(make_settings(data_dir, min_edges=1, cycle_deadline_s=0.3)) as client:
        a, b = _register(client, "a"), _register(client, "b")
        cycle = client.post("/v1/cycles", headers=a.headers).json()
        client.post("/v1/cycles", headers=b.headers)  # b joins and never uploads
        put_features(client, cycle["id"], a, make_upload(cycle, a.edge_id))
        assert client.get(f"/v1/cycles/{cycle['id']}", headers=ADMIN).json()["state"] == (
            "collecting"
        )
        done = wait_for_state(client, cycle["id"], {"done", "failed"}, timeout_s=20)
        assert done["state"] == "done", done["reason"]
        assert done["result_model_version"] == 2


def test_training_error_fails_the_cycle_and_the_server_lives_on(
    client: TestClient, new_edge: EdgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> TrainReport:
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(training, "train_upper", broken)
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
    failed = wait_for_state(client, cycle["id"], {"failed", "done"})
    assert failed["state"] == "failed"
    assert failed["reason"] == "training failed: RuntimeError('out of cheese')"
    assert client.get("/health").status_code == 200
    assert [m["version"] for m in client.get("/v1/models", headers=ADMIN).json()] == [1]


def test_too_few_rows_fail_with_the_training_message(
    client: TestClient, new_edge: EdgeFactory
) -> None:
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id, rows=3))
    failed = wait_for_state(client, cycle["id"], {"failed", "done"})
    assert failed["reason"] == (
        "training failed: train_upper needs at least 4 rows, with one label per row"
    )


class SlowTraining:
    """A train_upper that blocks until released, to observe the server meanwhile."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()
        self.real = training.train_upper

    def __call__(self, *args: Any, **kwargs: Any) -> TrainReport:
        self.started.set()
        try:
            assert self.release.wait(timeout=30), "the test never released training"
            return self.real(*args, **kwargs)
        finally:
            self.ended.set()


def test_api_stays_responsive_while_training(
    client: TestClient, new_edge: EdgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowTraining()
    monkeypatch.setattr(training, "train_upper", slow)
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
    try:
        assert slow.started.wait(timeout=10)
        for _ in range(5):
            # answered while training is held: requests do not wait for it
            assert client.get("/health").status_code == 200
            got = client.get(f"/v1/cycles/{cycle['id']}", headers=ADMIN).json()
            assert got["state"] == "training"
            assert not slow.ended.is_set()
        # A new cycle can be opened while the previous one trains.
        assert client.post("/v1/cycles", headers=edge.headers).status_code == 201
    finally:
        slow.release.set()
    assert wait_for_state(client, cycle["id"], {"done", "failed"})["state"] == "done"


def test_cancel_while_training_discards_the_result(
    client: TestClient, new_edge: EdgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowTraining()
    monkeypatch.setattr(training, "train_upper", slow)
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
    try:
        assert slow.started.wait(timeout=10)
        resp = client.post(f"/v1/cycles/{cycle['id']}/cancel", headers=ADMIN)
        assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    finally:
        slow.release.set()
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while runtime.training_ids and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not runtime.training_ids
    got = client.get(f"/v1/cycles/{cycle['id']}", headers=ADMIN).json()
    assert got["state"] == "cancelled" and got["result_model_version"] is None
    assert [m["version"] for m in client.get("/v1/models", headers=ADMIN).json()] == [1]


def test_restart_trains_a_cycle_left_in_training(data_dir: Path) -> None:
    settings = make_settings(data_dir)
    # Simulate a process that died while training: the cycle is `training` on disk,
    # with an upload stored.
    with running(settings) as client:
        edge = _register(client, "a")
        cycle = client.post("/v1/cycles", headers=edge.headers).json()
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        with runtime.sessions() as session:
            # Hold the cycle so that the upload does not start training right away.
            row = session.get(CycleRow, cycle["id"])
            row.min_edges = 5
            session.commit()
        put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
        with runtime.sessions() as session:
            row = session.get(CycleRow, cycle["id"])
            row.state = "training"
            session.commit()
    with running(settings) as client:
        done = wait_for_state(client, cycle["id"], {"done", "failed"})
        assert done["state"] == "done", done["reason"]
        assert done["result_model_version"] == 2


def test_shutdown_interrupts_training_and_the_next_start_resumes_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(data_dir)
    started = threading.Event()
    interrupted = threading.Event()

    def endless(*_args: Any, progress: Any = None, **_kwargs: Any) -> TrainReport:
        started.set()
        for epoch in range(3000):  # bounded: about 30 s if never interrupted
            try:
                progress(epoch / 3000, f"epoch {epoch}")
            except training.TrainingInterrupted:
                interrupted.set()
                raise
            time.sleep(0.01)
        raise AssertionError("training was not interrupted by the shutdown")

    with monkeypatch.context() as patch:
        patch.setattr(training, "train_upper", endless)
        with running(settings) as client:
            edge = _register(client, "a")
            cycle = client.post("/v1/cycles", headers=edge.headers).json()
            put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
            assert started.wait(timeout=10)
        # the shutdown cut in at the next epoch, not after the 3000
        assert interrupted.is_set()
    with running(settings) as client:
        done = wait_for_state(client, cycle["id"], {"done", "failed"})
        assert done["state"] == "done", done["reason"]


def test_a_training_failure_that_cannot_be_written_is_written_by_the_watcher(
    client: TestClient, new_edge: EdgeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24, defect 5: on a full disk even marking the cycle failed fails; it stayed
    ``training`` with no reason for good. The watcher now writes it once it can."""
    full = threading.Event()
    full.set()

    def no_space(*_args: Any, **_kwargs: Any) -> TrainReport:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_move = cycle_state.move

    def move(session: Any, cycle_id: int, target: CycleState, *args: Any, **kw: Any) -> bool:
        if target == CycleState.failed and full.is_set():
            full_db = sqlite3.OperationalError("database or disk is full")
            raise OperationalError("UPDATE cycles", {}, full_db)
        return real_move(session, cycle_id, target, *args, **kw)

    monkeypatch.setattr(training, "train_upper", no_space)
    monkeypatch.setattr(cycle_state, "move", move)
    edge = new_edge()
    cycle = client.post("/v1/cycles", headers=edge.headers).json()
    put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    for _ in range(600):  # bounded: 60 s
        if cycle["id"] in runtime.unrecorded_failures:
            break
        time.sleep(0.1)
    assert cycle["id"] in runtime.unrecorded_failures
    time.sleep(0.3)  # watcher passes while the disk is still full
    assert client.get(f"/v1/cycles/{cycle['id']}", headers=ADMIN).json()["state"] == "training"
    full.clear()  # space freed
    failed = wait_for_state(client, cycle["id"], {"failed", "done"})
    assert failed["state"] == "failed"
    assert failed["reason"] == (
        "training failed: the server's data dir is full (no space left on device)"
    )
    assert runtime.unrecorded_failures == {}


def test_the_same_uploads_train_the_same_model_whatever_the_edges_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed reproduces: the server takes the uploads in the order of the edges' names,
    not of their ids (whose random part would reorder the training rows)."""
    from fl_core import serialization
    from server_service.services import edges

    trained = []
    for run, ids in enumerate((["000000000000", "ffffffffffff"], ["ffffffffffff", "000000000000"])):
        suffixes = iter(ids)
        monkeypatch.setattr(edges.secrets, "token_hex", lambda _n, s=suffixes: next(s))
        with running(make_settings(tmp_path / f"server-{run}", min_edges=2)) as client:
            a, b = (_register(client, n) for n in ("line-a", "line-b"))
            assert [a.edge_id, b.edge_id] == [f"edge-{i}" for i in ids]
            cycle = client.post("/v1/cycles", headers=a.headers).json()
            put_features(client, cycle["id"], b, make_upload(cycle, b.edge_id, rows=8, seed=2))
            put_features(client, cycle["id"], a, make_upload(cycle, a.edge_id, rows=12, seed=1))
            done = wait_for_state(client, cycle["id"], {"done", "failed"})
            assert done["state"] == "done", done["reason"]
            weights = client.get("/v1/models/2/weights", headers=ADMIN).content
            trained.append(serialization.loads(weights)[0])
    first, second = trained
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
