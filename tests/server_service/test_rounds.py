"""Federated fine-tuning rounds through the server's API: a cycle whose head is trained
moves to ``rounds``; the edges that uploaded features send one update per round; the
server checks them, averages them into the round's model, applies the round deadline
and quorum, survives a restart between the last update and the aggregation, and ends
the cycle ``done`` with the last round's model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update

from fl_core import serialization
from fl_core.model import SplitModel, model_from_bytes
from fl_core.rounds import apply_aggregate, clip, pack_update, update_names
from fl_core.schemas import RoundPlan
from server_service import leases
from server_service.config import Settings
from server_service.db import CycleRow, make_engine, utcnow
from server_service.services import cycles, models, rounds
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
from tests.server_service.test_migrations import EDGE_TOKEN, _first_schema

ROUNDS: dict[str, Any] = {
    "rounds": 2,
    "round_clip_norm": 1.0,
    "round_deadline_s": 60.0,
    "min_edges": 2,
}


def _settings(data_dir: Path, **overrides: Any) -> Settings:
    return make_settings(data_dir, **{**ROUNDS, **overrides})


def _register(client: TestClient, name: str) -> Edge:
    resp = client.post("/v1/edges", json={"name": name}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return Edge(edge_id=body["edge_id"], name=body["name"], token=body["token"])


def _cycle(client: TestClient, cycle_id: int) -> dict[str, Any]:
    resp = client.get(f"/v1/cycles/{cycle_id}", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _to_rounds(
    client: TestClient, n_edges: int = 2, until: str = "rounds"
) -> tuple[dict[str, Any], list[Edge]]:
    """Edges that join one cycle and upload features; the cycle once its head is
    trained (in state ``until``)."""
    edges = [_register(client, f"line-{i}") for i in range(n_edges)]
    cycle = client.post("/v1/cycles", headers=edges[0].headers).json()
    for edge in edges[1:]:
        assert client.post("/v1/cycles", headers=edge.headers).json()["id"] == cycle["id"]
    for i, edge in enumerate(edges):
        resp = put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id, seed=i))
        assert resp.status_code == 201, resp.text
    ready = wait_for_state(client, cycle["id"], {until, "done", "failed"})
    assert ready["state"] == until, ready["reason"]
    return ready, edges


def _model(client: TestClient, version: int) -> SplitModel:
    resp = client.get(f"/v1/models/{version}/weights", headers=ADMIN)
    assert resp.status_code == 200
    return model_from_bytes(resp.content)


def _delta(
    model: SplitModel, plan: RoundPlan, seed: int, norm: float = 0.5
) -> dict[str, torch.Tensor]:
    """What an edge's training might have moved the round's tensors by (clipped)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    raw = {
        n: torch.randn(params[n].shape, generator=gen) for n in update_names(model, plan.train_from)
    }
    total = sum(float(t.pow(2).sum()) for t in raw.values()) ** 0.5
    delta, _ = clip({n: t * (norm / total) for n, t in raw.items()}, plan.clip_norm)
    return delta


def _pack(
    cycle: dict[str, Any],
    edge: Edge,
    delta: dict[str, torch.Tensor],
    samples: int,
    round_number: int | None = None,
    base_version: int | None = None,
) -> bytes:
    return pack_update(
        delta,
        RoundPlan.model_validate(cycle["plan"]),
        spec_hash=cycle["spec_hash"],
        edge_id=edge.edge_id,
        round_number=round_number or cycle["round"],
        base_version=base_version or cycle["round_model_version"],
        samples=samples,
    )


def _put(client: TestClient, cycle_id: int, round_number: int, edge: Edge, body: bytes) -> Any:
    return client.put(
        f"/v1/cycles/{cycle_id}/rounds/{round_number}/update",
        content=body,
        headers={**edge.headers, "Content-Type": "application/octet-stream"},
    )


def _as_sent(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update as the server reads it: rounded to float16 on the wire."""
    return {n: t.half().float() for n, t in delta.items()}


def _check_aggregated(
    client: TestClient,
    base_version: int,
    version: int,
    sent: list[tuple[dict[str, torch.Tensor], int]],
) -> None:
    """Model ``version`` is model ``base_version`` plus the sample-weighted mean (in
    float16)."""
    base, new = _model(client, base_version), _model(client, version)
    total = sum(samples for _, samples in sent)
    before, after = base.state_dict(), new.state_dict()
    moved = set(sent[0][0])
    for name in before:
        if name in moved:
            mean = sum(_as_sent(d)[name] * (s / total) for d, s in sent)
            # the mean is rounded to float16 before it is added
            torch.testing.assert_close(after[name] - before[name], mean, rtol=2**-10, atol=1e-6)
        else:
            assert torch.equal(after[name], before[name]), name


def _check_update_file(client: TestClient, parent: int, version: int) -> None:
    """Model ``version``'s averaged update, as edges download it, turns ``parent``'s
    weights into ``version``'s to the bit, in half the bytes of the changed tensors."""
    info = client.get(f"/v1/models/{version}", headers=ADMIN).json()
    manifest = client.get(f"/v1/models/{version}/manifest", headers=ADMIN).json()
    update = manifest["update"]
    assert update == info["trained_from"]["update"]
    parent_weights = client.get(f"/v1/models/{parent}/weights", headers=ADMIN).content
    weights = client.get(f"/v1/models/{version}/weights", headers=ADMIN).content
    assert update["parent"] == parent
    assert update["parent_sha256"] == serialization.sha256_bytes(parent_weights)
    assert update["dtype"] == "float16"
    resp = client.get(f"/v1/models/{version}/update", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    assert serialization.sha256_bytes(resp.content) == update["sha256"]
    assert len(resp.content) == update["size"]
    assert apply_aggregate(parent_weights, resp.content) == weights
    changed = [
        n
        for n, d in manifest["tensors"].items()
        if serialization.tensor_digests(parent_weights)[n] != d
    ]
    subset = client.post(
        f"/v1/models/{version}/weights/subset", headers=ADMIN, json={"names": changed}
    ).content
    assert len(resp.content) < 0.6 * len(subset)


@pytest.fixture
def rounds_settings(settings: Settings) -> Settings:
    """The server settings of conftest (SQLite, PostgreSQL) with two rounds."""
    return settings.model_copy(update=ROUNDS)


def test_two_rounds_average_the_updates_into_new_versions(rounds_settings: Settings) -> None:
    with running(rounds_settings) as client:
        cycle, (a, b) = _to_rounds(client)
        cid = cycle["id"]
        assert cycle["round"] == 1
        assert cycle["round_model_version"] == 2  # the head's
        assert cycle["result_model_version"] is None
        assert cycle["round_versions"] == [2]
        assert cycle["round_updates"] == []
        assert cycle["metrics"] is not None  # the head's validation metrics
        assert cycle["plan"] == {
            "rounds": 2,
            "train_from": "b1",  # tiny_cnn's fine-tuning stage
            "epochs": 3,
            "lr": 1e-3,
            "backbone_lr_scale": 0.1,
            "clip_norm": 1.0,
            "noise_multiplier": 0.0,
            "dtype": "float16",
            "deadline_s": 60.0,
        }
        assert client.get("/v1/models/2", headers=ADMIN).json()["parent"] == 1
        plan = RoundPlan.model_validate(cycle["plan"])
        head = _model(client, 2)

        # round 1: a sends, re-sends, then replaces its update; b's completes the round
        first_a = _pack(cycle, a, _delta(head, plan, seed=1), samples=12)
        resp = _put(client, cid, 1, a, first_a)
        assert resp.status_code == 201, resp.text
        ack = resp.json()
        assert (ack["cycle_id"], ack["round"], ack["edge_id"], ack["samples"]) == (
            cid,
            1,
            a.edge_id,
            12,
        )
        assert ack["norm"] == pytest.approx(0.5, rel=1e-3)
        assert (ack["unchanged"], ack["replaced"]) == (False, False)
        again = _put(client, cid, 1, a, first_a)
        assert again.status_code == 200
        assert again.json()["unchanged"] is True
        assert again.json()["sha256"] == ack["sha256"]
        shown = _cycle(client, cid)
        assert shown["state"] == "rounds" and shown["round"] == 1  # b is still missing
        assert [(u["edge_id"], u["round"], u["samples"]) for u in shown["round_updates"]] == [
            (a.edge_id, 1, 12)
        ]
        assert shown["round_updates"][0]["sha256"] == ack["sha256"]
        assert shown["round_updates"][0]["size"] == len(first_a)

        delta_a = _delta(head, plan, seed=2, norm=0.9)
        replaced = _put(client, cid, 1, a, _pack(cycle, a, delta_a, samples=30))
        assert replaced.status_code == 200, replaced.text
        assert (replaced.json()["unchanged"], replaced.json()["replaced"]) == (False, True)
        assert replaced.json()["samples"] == 30

        delta_b = _delta(head, plan, seed=3, norm=1.0)
        assert _put(client, cid, 1, b, _pack(cycle, b, delta_b, samples=10)).status_code == 201
        # aggregated by this request, or by the watcher that saw both updates first
        after_1 = _wait_round(client, cid, 2)
        assert after_1["state"] == "rounds", after_1["reason"]
        assert after_1["round"] == 2
        assert after_1["round_model_version"] == 3
        assert after_1["round_versions"] == [2, 3]
        assert after_1["round_updates"] == []  # round 2's, none yet
        _check_aggregated(client, 2, 3, [(delta_a, 30), (delta_b, 10)])
        info = client.get("/v1/models/3", headers=ADMIN).json()
        assert info["parent"] == 2
        assert info["trained_from"]["cycle_id"] == cid
        assert info["trained_from"]["round"] == 1
        assert info["trained_from"]["samples_per_edge"] == {a.edge_id: 30, b.edge_id: 10}
        assert sorted(info["trained_from"]["edges"]) == sorted([a.edge_id, b.edge_id])
        assert client.get("/v1/models/latest", headers=ADMIN).json()["version"] == 3
        _check_update_file(client, 2, 3)

        # round 1 is over: its stored update still answers 200, another one is refused
        late = _put(client, cid, 1, a, _pack(cycle, a, delta_a, samples=30))
        assert late.status_code == 200 and late.json()["unchanged"] is True
        stale = _put(client, cid, 1, b, _pack(cycle, b, delta_a, samples=3))
        assert stale.status_code == 409
        assert stale.json() == {"detail": f"cycle {cid} is at round 2; round 1 takes no updates"}

        # round 2, trained from model 3; the last round ends the cycle
        model_3 = _model(client, 3)
        delta_a2 = _delta(model_3, plan, seed=4)
        delta_b2 = _delta(model_3, plan, seed=5)
        assert _put(client, cid, 2, a, _pack(after_1, a, delta_a2, samples=5)).status_code == 201
        assert _put(client, cid, 2, b, _pack(after_1, b, delta_b2, samples=15)).status_code == 201
        done = wait_for_state(client, cid, {"done", "failed", "cancelled"}, timeout_s=20)
        assert done["state"] == "done", done["reason"]
        assert done["result_model_version"] == 4
        assert done["round"] == 2
        assert done["round_versions"] == [2, 3, 4]
        assert done["reason"] is None
        _check_aggregated(client, 3, 4, [(delta_a2, 5), (delta_b2, 15)])
        _check_update_file(client, 3, 4)
        # the head's model was trained, not aggregated: it has no update to offer
        head_update = client.get("/v1/models/2/update", headers=ADMIN)
        assert head_update.status_code == 404
        assert "not a federated round's aggregate" in head_update.json()["detail"]
        assert client.get("/v1/models/2/manifest", headers=ADMIN).json()["update"] is None
        assert client.get("/v1/models/4", headers=ADMIN).json()["parent"] == 3
        after_done = _put(client, cid, 2, a, _pack(after_1, a, delta_b2, samples=5))
        assert after_done.status_code == 409
        assert after_done.json() == {
            "detail": f"cycle {cid} is done; updates are accepted only while its rounds run"
        }
        # the next cycle starts from the last round's model
        nxt = client.post("/v1/cycles", headers=a.headers).json()
        assert nxt["base_model_version"] == 4


def test_without_rounds_a_cycle_is_done_with_its_head(data_dir: Path) -> None:
    with running(make_settings(data_dir)) as client:
        edge = _register(client, "only")
        cycle = client.post("/v1/cycles", headers=edge.headers).json()
        assert cycle["plan"]["rounds"] == 0
        put_features(client, cycle["id"], edge, make_upload(cycle, edge.edge_id))
        done = wait_for_state(client, cycle["id"], {"done", "failed", "rounds"})
        assert done["state"] == "done"
        assert done["result_model_version"] == 2
        assert done["round_versions"] == [2]
        assert done["round_model_version"] is None and done["round"] == 0
        resp = _put(client, cycle["id"], 1, edge, b"whatever")
        assert resp.status_code == 409
        assert resp.json() == {
            "detail": f"cycle {cycle['id']} is done; updates are accepted only while its rounds run"
        }


def test_who_may_send_an_update_and_when(data_dir: Path) -> None:
    with running(_settings(data_dir)) as client:
        a, b, outsider = (_register(client, n) for n in ("a", "b", "outsider"))
        cycle = client.post("/v1/cycles", headers=a.headers).json()
        client.post("/v1/cycles", headers=b.headers)
        client.post("/v1/cycles", headers=outsider.headers)  # joins, never uploads
        cid = cycle["id"]
        put_features(client, cid, a, make_upload(cycle, a.edge_id, seed=1))
        # collecting: no round runs yet
        early = _put(client, cid, 1, a, b"x")
        assert early.status_code == 409
        assert early.json() == {
            "detail": f"cycle {cid} is collecting; updates are accepted only while its rounds run"
        }
        put_features(client, cid, b, make_upload(cycle, b.edge_id, seed=2))
        # outsider joined and uploaded nothing: the deadline would have trained without
        # it; here an operator starts training now
        ready = _cycle(client, cid)
        if ready["state"] == "collecting":
            client.post(f"/v1/cycles/{cid}/train", headers=ADMIN)
        ready = wait_for_state(client, cid, {"rounds", "done", "failed"})
        assert ready["state"] == "rounds", ready["reason"]
        plan = RoundPlan.model_validate(ready["plan"])
        good = _pack(ready, outsider, _delta(_model(client, 2), plan, seed=1), samples=4)

        forbidden = _put(client, cid, 1, outsider, good)
        assert forbidden.status_code == 403
        assert forbidden.json() == {
            "detail": f"edge {outsider.edge_id} uploaded no features to cycle {cid}: only "
            "the edges its head was trained on take part in its rounds"
        }
        by_admin = client.put(
            f"/v1/cycles/{cid}/rounds/1/update",
            content=good,
            headers={**ADMIN, "Content-Type": "application/octet-stream"},
        )
        assert by_admin.status_code == 403
        wrong_round = _put(client, cid, 2, a, _pack(ready, a, {}, samples=1, round_number=2))
        assert wrong_round.status_code == 409
        assert wrong_round.json() == {
            "detail": f"cycle {cid} is at round 1; round 2 takes no updates"
        }
        assert _put(client, 999, 1, a, good).status_code == 404
        assert _put(client, cid, 0, a, good).status_code == 422
        assert _put(client, cid, 51, a, good).status_code == 422
        unauthenticated = client.put(f"/v1/cycles/{cid}/rounds/1/update", content=good)
        assert unauthenticated.status_code == 401
        assert _cycle(client, cid)["round_updates"] == []


def test_an_update_over_the_norm_bound_is_refused(data_dir: Path) -> None:
    with running(_settings(data_dir)) as client:
        cycle, (a, _b) = _to_rounds(client)
        cid = cycle["id"]
        plan = RoundPlan.model_validate(cycle["plan"])
        head = _model(client, 2)
        delta = _delta(head, plan, seed=1)
        long = {n: t * 3.0 for n, t in delta.items()}  # 1.5, the bound is 1.0
        resp = _put(client, cid, 1, a, _pack(cycle, a, long, samples=10))
        assert resp.status_code == 422
        assert resp.json() == {
            "detail": "the update's L2 norm 1.5 is over the round's clip bound 1: "
            "clip it on the edge"
        }

        refusals = {
            "not a safetensors file": b"not a safetensors file at all",
            "another feature spec": pack_update(
                delta,
                plan,
                spec_hash="0" * 64,
                edge_id=a.edge_id,
                round_number=1,
                base_version=2,
                samples=10,
            ),
            "trained from model '1'; round 1 trains model 2": _pack(
                cycle, a, delta, samples=10, base_version=1
            ),
            "the update is for round '2'; this route takes round 1": _pack(
                cycle, a, delta, samples=10, round_number=2
            ),
            "1 missing (first 'head.4.bias')": _pack(
                cycle, a, {n: t for n, t in delta.items() if n != "head.4.bias"}, samples=10
            ),
            "fedinspect.samples must be between 1 and": _pack(cycle, a, delta, samples=10**9),
            "holds NaN or Inf": _pack(
                cycle, a, {n: t * float("nan") for n, t in delta.items()}, samples=10
            ),
        }
        for expected, body in refusals.items():
            resp = _put(client, cid, 1, a, body)
            assert resp.status_code == 422, expected
            assert expected in resp.json()["detail"], resp.json()
        # none was stored, and the round still takes a's valid update
        assert _cycle(client, cid)["round_updates"] == []
        assert _put(client, cid, 1, a, _pack(cycle, a, delta, samples=10)).status_code == 201


def test_the_deadline_aggregates_with_the_quorum(data_dir: Path) -> None:
    with running(_settings(data_dir, min_edges=1)) as client:
        cycle, (a, b) = _to_rounds(client)
        cid = cycle["id"]
        plan = RoundPlan.model_validate(cycle["plan"])
        delta = _delta(_model(client, 2), plan, seed=1)
        assert _put(client, cid, 1, a, _pack(cycle, a, delta, samples=8)).status_code == 201
        assert _cycle(client, cid)["round"] == 1  # b may still send before the deadline
        _expire_round(client, cid)
        nxt = _wait_round(client, cid, 2)
        assert nxt["state"] == "rounds" and nxt["round_model_version"] == 3
        _check_aggregated(client, 2, 3, [(delta, 8)])
        info = client.get("/v1/models/3", headers=ADMIN).json()
        assert info["trained_from"]["samples_per_edge"] == {a.edge_id: 8}
        # the new round's deadline is a fresh one
        assert nxt["round_deadline"] is not None
        late_b = _put(client, cid, 1, b, _pack(cycle, b, delta, samples=8))
        assert late_b.status_code == 409


def test_the_deadline_without_the_quorum_ends_the_cycle_with_the_last_model(
    data_dir: Path,
) -> None:
    with running(_settings(data_dir, round_deadline_s=0.5)) as client:
        # the round's deadline may pass before the first look at the cycle
        cycle, _edges = _to_rounds(client, until="done")
        cid = cycle["id"]
        done = wait_for_state(client, cid, {"done", "failed", "cancelled"}, timeout_s=20)
        assert done["state"] == "done"
        assert done["result_model_version"] == 2  # the head: round 1 never aggregated
        assert done["round_versions"] == [2]
        assert done["reason"] == (
            "round 1: its deadline passed with 0 update(s), 2 needed; the cycle ends with model 2"
        )
        assert [m["version"] for m in client.get("/v1/models", headers=ADMIN).json()] == [1, 2]


def _lose_blob(client: TestClient, sha256: str) -> None:
    """The store loses an acknowledged update's bytes (a disk fault, an operator)."""
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    rt.blobs.local_path(sha256).unlink()


@pytest.mark.parametrize("min_edges", [1, 2])
def test_an_update_whose_blob_is_lost_is_left_out_or_ends_the_rounds(
    data_dir: Path, min_edges: int
) -> None:
    with running(_settings(data_dir, min_edges=min_edges)) as client:
        cycle, (a, b) = _to_rounds(client)
        cid = cycle["id"]
        plan = RoundPlan.model_validate(cycle["plan"])
        head = _model(client, 2)
        delta_a, delta_b = _delta(head, plan, seed=1), _delta(head, plan, seed=2)
        ack = _put(client, cid, 1, a, _pack(cycle, a, delta_a, samples=8))
        assert ack.status_code == 201
        _lose_blob(client, ack.json()["sha256"])
        assert _put(client, cid, 1, b, _pack(cycle, b, delta_b, samples=6)).status_code == 201
        if min_edges == 1:  # b's update alone is a quorum: the round goes on without a's
            nxt = _wait_round(client, cid, 2)
            assert nxt["state"] == "rounds" and nxt["round_model_version"] == 3
            _check_aggregated(client, 2, 3, [(delta_b, 6)])
            info = client.get("/v1/models/3", headers=ADMIN).json()
            assert info["trained_from"]["samples_per_edge"] == {b.edge_id: 6}
        else:  # not a quorum: the rounds end with the head's model, saying why
            done = wait_for_state(client, cid, {"done", "failed", "cancelled"}, timeout_s=20)
            assert done["state"] == "done" and done["result_model_version"] == 2
            assert done["reason"] == (
                "round 1: 1 of its stored updates could be read back from the blob store "
                "(2 needed; the others' blobs are missing or corrupt); the cycle ends with "
                "model 2"
            )


def test_the_deadline_of_a_later_round_keeps_the_earlier_rounds(data_dir: Path) -> None:
    with running(_settings(data_dir, min_edges=2)) as client:
        cycle, (a, b) = _to_rounds(client)
        cid = cycle["id"]
        plan = RoundPlan.model_validate(cycle["plan"])
        head = _model(client, 2)
        for i, edge in enumerate((a, b)):
            body = _pack(cycle, edge, _delta(head, plan, seed=i), samples=5)
            assert _put(client, cid, 1, edge, body).status_code == 201
        at_2 = _wait_round(client, cid, 2)
        assert at_2["round"] == 2
        body = _pack(at_2, a, _delta(_model(client, 3), plan, seed=9), samples=5)
        assert _put(client, cid, 2, a, body).status_code == 201
        _expire_round(client, cid)
        done = wait_for_state(client, cid, {"done", "failed", "cancelled"}, timeout_s=20)
        assert done["state"] == "done"
        assert done["result_model_version"] == 3
        assert done["round_versions"] == [2, 3]
        assert done["reason"] == (
            "round 2: its deadline passed with 1 update(s), 2 needed; the cycle ends with model 3"
        )


def _expire_round(client: TestClient, cycle_id: int) -> None:
    """Move the running round's deadline into the past (the watcher then acts)."""
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    with rt.sessions() as session:
        session.execute(
            update(CycleRow)
            .where(CycleRow.id == cycle_id)
            .values(round_deadline=utcnow() - timedelta(seconds=1))
        )
        session.commit()


def _wait_round(client: TestClient, cycle_id: int, round_number: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        cycle = _cycle(client, cycle_id)
        if cycle["round"] >= round_number or cycle["state"] != "rounds":
            return cycle
        assert time.monotonic() < deadline, cycle
        time.sleep(0.02)


def test_cancel_while_rounds_run(data_dir: Path) -> None:
    with running(_settings(data_dir)) as client:
        cycle, (a, _b) = _to_rounds(client)
        cid = cycle["id"]
        resp = client.post(f"/v1/cycles/{cid}/cancel", headers=ADMIN)
        assert resp.status_code == 200
        assert resp.json()["state"] == "cancelled"
        assert resp.json()["reason"] == "cancelled by an operator"
        plan = RoundPlan.model_validate(cycle["plan"])
        body = _pack(cycle, a, _delta(_model(client, 2), plan, seed=1), samples=3)
        refused = _put(client, cid, 1, a, body)
        assert refused.status_code == 409
        assert refused.json() == {
            "detail": f"cycle {cid} is cancelled; updates are accepted only while its rounds run"
        }
        again = client.post(f"/v1/cycles/{cid}/cancel", headers=ADMIN)
        assert again.status_code == 409


def test_a_restart_between_the_last_update_and_the_aggregation(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(data_dir)
    sent = []
    with running(settings) as client:
        cycle, edges = _to_rounds(client)
        cid = cycle["id"]
        plan = RoundPlan.model_validate(cycle["plan"])
        head = _model(client, 2)
        # the process dies after storing the last update, before aggregating it
        monkeypatch.setattr(rounds, "evaluate_round", lambda *_a, **_k: "wait")
        for i, edge in enumerate(edges):
            delta = _delta(head, plan, seed=10 + i)
            sent.append((delta, 6 + i))
            assert _put(client, cid, 1, edge, _pack(cycle, edge, delta, 6 + i)).status_code == 201
        shown = _cycle(client, cid)
        assert (shown["state"], shown["round"], len(shown["round_updates"])) == ("rounds", 1, 2)
    monkeypatch.undo()

    with running(settings) as client:
        nxt = _wait_round(client, cid, 2)
        assert nxt["state"] == "rounds"
        assert nxt["round_model_version"] == 3
        assert nxt["round_versions"] == [2, 3]
        _check_aggregated(client, 2, 3, sent)


def test_openapi_documents_the_update_route(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v1/cycles/{cycle_id}/rounds/{round_number}/update"]["put"]
    assert op["requestBody"]["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    assert {"200", "201", "401", "403", "404", "409", "413", "422"} <= set(op["responses"])
    ack = op["responses"]["201"]["content"]["application/json"]["schema"]
    assert ack == {"$ref": "#/components/schemas/RoundUpdateAck"}
    assert op.get("security")
    cycle_schema = doc["components"]["schemas"]["Cycle"]["properties"]
    assert {"plan", "round", "round_model_version", "round_versions", "round_updates"} <= set(
        cycle_schema
    )


def test_a_burst_of_joins_loads_the_base_model_once_for_spec_and_plan(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the plan is resolved against the base model like the spec: building it for each of
    # the requests that open the cycle at once loaded the model once per request
    loads = []
    real = models.load_model

    def slow_load(rt: Any, row: Any) -> Any:
        loads.append(row.version)
        time.sleep(0.2)
        return real(rt, row)

    monkeypatch.setattr(models, "load_model", slow_load)
    monkeypatch.setattr(cycles, "load_model", slow_load, raising=False)
    with running(_settings(data_dir)) as client:
        edges = [_register(client, f"e{i}") for i in range(6)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda e: client.post("/v1/cycles", headers=e.headers), edges))
        assert sorted(a.status_code for a in answers) == [200] * 5 + [201]
        assert {a.json()["plan"]["train_from"] for a in answers} == {"b1"}
    assert loads == [1]


def test_a_plan_may_train_everything_above_the_cut(data_dir: Path) -> None:
    # "upper" is fl_core.training's name for the stages above the cut
    with running(_settings(data_dir, round_train_from="upper")) as client:
        cycle, (a, _b) = _to_rounds(client)
        assert cycle["plan"]["train_from"] == "upper"
        plan = RoundPlan.model_validate(cycle["plan"])
        head = _model(client, 2)
        delta = _delta(head, plan, seed=1)
        assert set(delta) == {n for n, _ in head.head.named_parameters(prefix="head")}
        assert _put(client, cycle["id"], 1, a, _pack(cycle, a, delta, 4)).status_code == 201


def test_an_unknown_first_stage_is_named(data_dir: Path) -> None:
    with running(_settings(data_dir, round_train_from="b9")) as client:
        edge = _register(client, "a")
        resp = client.post("/v1/cycles", headers=edge.headers)
        assert resp.status_code == 422
        assert resp.json() == {"detail": "unknown stage 'b9'; stages: stem, b0, b1, pooled"}


def test_one_round_that_fails_to_aggregate_holds_up_no_other_cycle(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(_settings(data_dir)) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        # the test runs the watcher's pass itself
        monkeypatch.setattr(leases, "acquire", lambda *_a, **_k: False)
        rt.watching = False
        now = utcnow()
        with rt.sessions() as session:
            for _ in range(2):
                session.add(
                    CycleRow(
                        state="rounds",
                        base_model_version=1,
                        spec_json="{}",
                        spec_hash="0" * 64,
                        min_edges=1,
                        deadline=now,
                        created_at=now,
                        updated_at=now,
                        round=1,
                        round_model_version=1,
                        round_deadline=now + timedelta(hours=1),
                    )
                )
            session.commit()
        seen = []

        def evaluate(_rt: Any, cycle_id: int, now: Any = None) -> str:
            seen.append(cycle_id)
            if cycle_id == 1:
                raise FileNotFoundError("blob of an update lost")
            return "wait"

        monkeypatch.setattr(rounds, "evaluate_round", evaluate)
        rounds.check_rounds(rt)  # the watcher's pass over the rounds: logs, goes on
        assert set(seen) == {1, 2}


def test_a_cycle_of_the_first_schema_reads_as_one_shot(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        _first_schema(engine)
    finally:
        engine.dispose()
    with running(settings.model_copy(update=ROUNDS)) as client:
        old = _cycle(client, 1)
        assert old["state"] == "cancelled"
        assert old["plan"] is None
        assert (old["round"], old["round_model_version"], old["round_deadline"]) == (0, None, None)
        assert (old["round_versions"], old["round_updates"]) == ([], [])
        # a cycle opened now carries the plan of these settings
        joined = client.post("/v1/cycles", headers={"Authorization": f"Bearer {EDGE_TOKEN}"})
        assert joined.json()["id"] == 2
        assert joined.json()["plan"]["rounds"] == 2
