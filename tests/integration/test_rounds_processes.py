"""Federated fine-tuning rounds with REAL processes on 127.0.0.1: a server and three
edges started as ``python -c "from ... import run; run()"``, each edge running its
``cycle`` job (stage 2, the rounds, stage 3) over HTTP, a tiny CNN on a tiny ImageFolder.

- the server is SIGKILLed mid-round (a round held open by pausing one edge with SIGSTOP
  once the other edges' updates are acknowledged) and restarted on the same port and
  data dir: the cycle finishes both rounds, no acknowledged update lost, every edge's
  job ends done;
- an edge is SIGKILLed as the rounds start, before it sent its update (paused since it
  uploaded its features): the round is aggregated at its deadline with the quorum of
  the two live edges.

Each prints what it checked; a failure shows the logs of every process.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import make_image_folder
from tests.integration.processes import HOST, Process, free_port, wait_healthy
from tests.integration.replicas import TINY

pytestmark = pytest.mark.slow

CLASSES = ["bright", "dark"]


@dataclass
class Edge:
    name: str
    edge_id: str
    url: str
    proc: Process
    admin: dict[str, str]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.admin, timeout=30)


@dataclass
class Fleet:
    """A server (restartable on its port and data dir) and its edges, every process's
    output kept in ``log_dir``; ``stop()`` ends them all."""

    log_dir: Path
    dataset: Path
    server_env: dict[str, str] = field(default_factory=dict)
    server: Process | None = None
    incarnation: int = 0
    edges: list[Edge] = field(default_factory=list)
    procs: list[Process] = field(default_factory=list)
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def server_url(self) -> str:
        return f"http://{HOST}:{self.server_env['FEDINSPECT_SERVER_PORT']}"

    def start_server(self, **settings: str) -> Process:
        if not self.server_env:
            self.server_env = {
                **TINY,
                "FEDINSPECT_SERVER_ADMIN_TOKEN": self.admin_token,
                "FEDINSPECT_SERVER_DATA_DIR": str(self.log_dir / "server"),
                "FEDINSPECT_SERVER_HOST": HOST,
                "FEDINSPECT_SERVER_PORT": str(free_port()),
                "FEDINSPECT_SERVER_CLASS_NAMES": json.dumps(CLASSES),
                **{f"FEDINSPECT_SERVER_{k.upper()}": v for k, v in settings.items()},
            }
        self.incarnation += 1
        self.server = Process(f"server-{self.incarnation}", "server", self.server_env, self.log_dir)
        self.procs.append(self.server)
        wait_healthy(self.server_url, self.server, timeout=120)
        return self.server

    def kill_server(self) -> int | None:
        assert self.server is not None
        self.server.kill()
        return self.server.poll()

    def add_edge(self, name: str, **settings: str) -> Edge:
        reg = httpx.post(
            f"{self.server_url}/v1/edges", headers=self.admin, json={"name": name}, timeout=30
        )
        assert reg.status_code in (200, 201), reg.text
        port = free_port()
        admin = secrets.token_urlsafe(24)
        env = {
            "FEDINSPECT_EDGE_SERVER_URL": self.server_url,
            "FEDINSPECT_EDGE_TOKEN": reg.json()["token"],
            "FEDINSPECT_EDGE_EDGE_ID": reg.json()["edge_id"],
            "FEDINSPECT_EDGE_ADMIN_TOKEN": admin,
            "FEDINSPECT_EDGE_NAME": name,
            "FEDINSPECT_EDGE_HOST": HOST,
            "FEDINSPECT_EDGE_PORT": str(port),
            "FEDINSPECT_EDGE_DATA_DIR": str(self.log_dir / name),
            "FEDINSPECT_EDGE_DATASET": str(self.dataset),
            "FEDINSPECT_EDGE_EXTRACT_BACKEND": "torch",
            "FEDINSPECT_EDGE_BATCH_SIZE": "16",
            "FEDINSPECT_EDGE_FINETUNE_EPOCHS": "2",
            "FEDINSPECT_EDGE_FINETUNE_VIEWS": "1",
            "FEDINSPECT_EDGE_FINETUNE_AUGMENT": "false",
            "FEDINSPECT_EDGE_FINETUNE_TRAIN_FROM": "b1",
            "FEDINSPECT_EDGE_POLL_INTERVAL_S": "0.2",
            "FEDINSPECT_EDGE_POLL_MAX_INTERVAL_S": "0.5",
            # a server restart takes seconds: the edges' retries carry them through it
            "FEDINSPECT_EDGE_RETRY_BASE_S": "0.2",
            "FEDINSPECT_EDGE_RETRY_MAX_S": "1",
            "FEDINSPECT_EDGE_RETRY_BUDGET_S": "120",
            **{f"FEDINSPECT_EDGE_{k.upper()}": v for k, v in settings.items()},
        }
        proc = Process(name, "edge", env, self.log_dir, threads=1)
        self.procs.append(proc)
        edge = Edge(
            name,
            reg.json()["edge_id"],
            f"http://{HOST}:{port}",
            proc,
            {"Authorization": f"Bearer {admin}"},
        )
        self.edges.append(edge)
        return edge

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(6000)}" for p in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.proc.send_signal(signal.SIGCONT)  # one a test paused
            proc.stop()

    # ------------------------------------------------------------------ server reads

    def get(self, path: str) -> Any:
        resp = httpx.get(f"{self.server_url}{path}", headers=self.admin, timeout=30)
        assert resp.status_code == 200, f"GET {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def the_cycle(self) -> dict[str, Any] | None:
        cycles = self.get("/v1/cycles")
        assert len(cycles) <= 1, f"the edges ended in several cycles: {cycles}"
        return cycles[0] if cycles else None


def start_job(edge: Edge) -> str:
    with edge.client() as client:
        started = client.post("/v1/jobs/cycle")
    assert started.status_code == 202, started.text
    job_id: str = started.json()["id"]
    return job_id


def get_job(edge: Edge, job_id: str) -> dict[str, Any]:
    with edge.client() as client:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return job


def wait_for(
    fleet: Fleet,
    what: str,
    check: Callable[[], Any],
    timeout: float,
    alive: list[Process] | None = None,
    jobs: dict[str, str] | None = None,
) -> Any:
    """Poll ``check()`` until it returns something truthy; fail with every log after
    ``timeout`` s, when a process of ``alive`` exits, or when a job of ``jobs`` (edge
    name -> job id) fails."""
    by_name = {e.name: e for e in fleet.edges}
    deadline = time.monotonic() + timeout
    while True:
        for proc in alive or []:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.name} exited waiting for {what}\n{fleet.logs()}")
        for name, job_id in (jobs or {}).items():
            job = get_job(by_name[name], job_id)
            if job["state"] == "failed":
                raise AssertionError(
                    f"{name}'s job failed waiting for {what}: {job['error']}\n{fleet.logs()}"
                )
        try:
            got = check()
        except httpx.TransportError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout:.0f} s\n{fleet.logs()}")
        time.sleep(0.05)


def wait_jobs_done(
    fleet: Fleet, jobs: dict[str, str], timeout: float, alive: list[Process]
) -> dict[str, dict[str, Any]]:
    by_name = {e.name: e for e in fleet.edges}
    ended: dict[str, dict[str, Any]] = {}

    def all_ended() -> bool:
        for name, job_id in jobs.items():
            if name not in ended:
                job = get_job(by_name[name], job_id)
                if job["state"] in ("done", "failed"):
                    ended[name] = job
        return len(ended) == len(jobs)

    wait_for(fleet, "end of every edge's cycle job", all_ended, timeout, alive)
    failed = {n: j["error"] for n, j in ended.items() if j["state"] != "done"}
    assert not failed, f"jobs failed: {failed}\n{fleet.logs()}"
    return ended


def pause_when_waiting(fleet: Fleet, edge: Edge, job_id: str) -> None:
    """SIGSTOP ``edge`` once its cycle job has uploaded its features and seen its cycle
    still collecting (it cannot be in a round before it polls again)."""
    wait_for(
        fleet,
        f"{edge.name} waiting on a collecting cycle",
        lambda: "(collecting)" in get_job(edge, job_id)["message"],
        60,
        fleet.procs,
        {edge.name: job_id},
    )
    edge.proc.proc.send_signal(signal.SIGSTOP)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _report(capsys: pytest.CaptureFixture[str], title: str, counts: dict[str, Any]) -> None:
    with capsys.disabled():
        print(f"\n{title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    dataset = make_image_folder(
        tmp_path / "images", per_class=20, size=32, classes=("dark", "bright")
    )
    made = Fleet(tmp_path, dataset)
    try:
        yield made
    finally:
        made.stop()


def test_server_killed_mid_round_finishes_the_cycle(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.start_server(min_edges="3", rounds="2", round_deadline_s="300")
    edges = [fleet.add_edge("edge-1"), fleet.add_edge("edge-2"), fleet.add_edge("edge-3")]
    for edge in edges:
        wait_healthy(edge.url, edge.proc, timeout=120)
    edge_procs = [e.proc for e in edges]
    assert fleet.server is not None
    # edge-3 first: once its features are uploaded and it waits, it is paused (SIGSTOP);
    # round 1 cannot complete without its update, so the others' updates are
    # acknowledged and wait there for the kill
    slow = edges[2]
    jobs = {slow.name: start_job(slow)}
    pause_when_waiting(fleet, slow, jobs[slow.name])
    running = {e.name: start_job(e) for e in edges[:2]}  # a paused edge answers nothing
    jobs.update(running)

    def mid_round() -> dict[str, Any] | None:
        cycle = fleet.the_cycle()
        assert cycle is not None
        assert cycle["state"] in ("collecting", "training", "rounds"), cycle
        if cycle["state"] == "rounds" and len(cycle["round_updates"]) == 2:
            return cycle
        return None

    seen = wait_for(
        fleet, "two acknowledged round updates", mid_round, 90, [fleet.server, *edge_procs], running
    )
    code = fleet.kill_server()
    acked = {(u["round"], u["edge_id"]) for u in seen["round_updates"]}
    killed_at_round = seen["round"]
    assert code == -signal.SIGKILL, f"the server was not killed (exit {code})"
    assert acked == {(1, e.edge_id) for e in edges[:2]}, seen

    server = fleet.start_server()
    slow.proc.proc.send_signal(signal.SIGCONT)
    ended = wait_jobs_done(fleet, jobs, 180, [server, *edge_procs])

    cycle = fleet.get(f"/v1/cycles/{seen['id']}")
    assert cycle["state"] == "done", cycle
    assert cycle["round"] == 2 and cycle["reason"] is None, cycle
    versions = cycle["round_versions"]
    assert len(versions) == 3 and cycle["result_model_version"] == versions[-1], cycle
    ids = sorted(e.edge_id for e in edges)
    assert sorted(u["edge_id"] for u in cycle["uploads"]) == ids
    aggregated = {}
    for r in (1, 2):
        trained_from = fleet.get(f"/v1/models/{versions[r]}")["trained_from"]
        assert trained_from["cycle_id"] == cycle["id"] and trained_from["round"] == r
        # every participant's update of every round went into its model
        assert sorted(trained_from["samples_per_edge"]) == ids, (r, trained_from)
        aggregated[r] = trained_from["samples_per_edge"]
    # the updates acknowledged before the kill among them
    lost = [(r, edge_id) for r, edge_id in acked if edge_id not in aggregated[r]]
    assert not lost, f"acknowledged before the kill, not aggregated: {lost}"
    for edge in edges:
        result = ended[edge.name]["result"]
        assert result["cycle_id"] == cycle["id"]
        assert [x["round"] for x in result["rounds"]] == [1, 2], (edge.name, result["rounds"])
        assert [x["model_version"] for x in result["rounds"]] == versions[:2]
        assert result["model_version"] == versions[-1]
        # round 2's model and the result are their parents plus the averaged update
        assert result["downloads"][-2:] == ["update", "update"], (edge.name, result)
    _report(
        capsys,
        "server killed mid-round",
        {
            "killed at round": killed_at_round,
            "updates acknowledged before the kill": len(acked),
            "rounds completed": cycle["round"],
            "model versions": versions,
            "jobs done": len(ended),
        },
    )


def test_a_round_with_one_edge_gone_finishes_with_the_quorum(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    deadline_s = 20
    fleet.start_server(min_edges="2", rounds="1", round_deadline_s=str(deadline_s))
    gone = fleet.add_edge("edge-gone")
    live = [fleet.add_edge("edge-1"), fleet.add_edge("edge-2")]
    for edge in (gone, *live):
        wait_healthy(edge.url, edge.proc, timeout=120)
    assert fleet.server is not None
    all_procs = [fleet.server, gone.proc, *(e.proc for e in live)]

    jobs = {gone.name: start_job(gone)}
    # its features uploaded, it waits for the head: paused there (SIGSTOP) it can send no
    # update whenever the round starts; it is SIGKILLed as the round starts
    pause_when_waiting(fleet, gone, jobs[gone.name])
    # the others join at once (before either uploads: the quorum of 2 waits for both)
    live_jobs = {e.name: start_job(e) for e in live}

    def in_rounds() -> dict[str, Any] | None:
        cycle = fleet.the_cycle()
        assert cycle is not None
        assert cycle["state"] in ("collecting", "training", "rounds"), cycle
        return cycle if cycle["state"] == "rounds" else None

    seen = wait_for(fleet, "the cycle's round 1", in_rounds, 90, all_procs, live_jobs)
    gone.proc.kill()
    assert gone.proc.poll() == -signal.SIGKILL
    assert gone.edge_id not in {u["edge_id"] for u in seen["round_updates"]}, seen
    round_deadline = _time(seen["round_deadline"])

    ended = wait_jobs_done(
        fleet, live_jobs, deadline_s + 120, [fleet.server, *(e.proc for e in live)]
    )

    cycle = fleet.get(f"/v1/cycles/{seen['id']}")
    ids = sorted(e.edge_id for e in live)
    assert cycle["state"] == "done" and cycle["round"] == 1, cycle
    assert sorted(u["edge_id"] for u in cycle["uploads"]) == sorted([*ids, gone.edge_id])
    versions = cycle["round_versions"]
    assert len(versions) == 2 and cycle["result_model_version"] == versions[-1], cycle
    # aggregated at the deadline (the gone edge was waited for), not before
    assert _time(cycle["updated_at"]) >= round_deadline, (cycle["updated_at"], round_deadline)
    trained_from = fleet.get(f"/v1/models/{versions[-1]}")["trained_from"]
    assert trained_from["round"] == 1 and trained_from["edges"] == ids, trained_from
    assert sorted(trained_from["samples_per_edge"]) == ids, trained_from
    for edge in live:
        result = ended[edge.name]["result"]
        assert result["cycle_id"] == cycle["id"]
        assert [x["round"] for x in result["rounds"]] == [1], (edge.name, result["rounds"])
        assert result["model_version"] == versions[-1]
    _report(
        capsys,
        "an edge killed at round 1",
        {
            "participants": len(cycle["uploads"]),
            "updates aggregated": len(trained_from["edges"]),
            "quorum": cycle["min_edges"],
            "model versions": versions,
            "live jobs done": len(ended),
        },
    )
