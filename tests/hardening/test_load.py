"""Load: 200 concurrent simulated edges against one real server process for 60 s.

Each simulated edge (an asyncio task with its own token) loops over the edge's
protocol: request/join a cycle, upload features packed for the cycle's spec, poll the
cycle until it ends, download the resulting model's weights and check their sha256.
Every answer must be a success, or a documented 429/503 carrying ``Retry-After``
(then the edge waits as told). A 409 to an upload is the protocol, not an error: the
cycle's deadline passed between joining and uploading (likely on 2 busy cores), and
the edge joins the next cycle; such answers are counted in the report. p99 latency
and the server's peak RSS are written to ``load.json`` in the test's tmp dir and
printed; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from fl_core.features import pack_features
from fl_core.schemas import FeatureSpec
from tests.hardening.procs import SERVER_ADMIN_TOKEN, free_port, services
from tests.server_service.helpers import random_rows

EDGES = 200
DURATION_S = 60.0
RETRYABLE = {429, 503}


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.errors: list[str] = []
        self.cycles_done: set[int] = set()
        self.downloads = 0
        self.reconnects = 0

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _call(
    http: httpx.AsyncClient, stats: Stats, method: str, url: str, ok: set[int], **kw: Any
) -> httpx.Response | None:
    """One request; None after a documented 429/503 (slept per Retry-After)."""
    started = time.perf_counter()
    try:
        try:
            response = await http.request(method, url, **kw)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # The server closed a kept-alive connection as this request went out (its
            # keep-alive timer ran while 2 busy cores delayed the read): the client sees
            # the close, or the reset of a socket closed with the request unread. A real
            # edge's client retries transport errors, so does this one, once, on a new one.
            stats.reconnects += 1
            response = await http.request(method, url, **kw)
    except httpx.HTTPError as exc:
        stats.errors.append(f"{method} {url}: {type(exc).__name__}: {exc}")
        return None
    stats.latencies.append(time.perf_counter() - started)
    stats.statuses[f"{method} {response.status_code}"] += 1
    if response.status_code in ok:
        return response
    if response.status_code in RETRYABLE and "Retry-After" in response.headers:
        await asyncio.sleep(min(5.0, float(response.headers["Retry-After"])))
        return None
    stats.errors.append(f"{method} {url}: {response.status_code} {response.text[:200]}")
    return None


async def _edge(url: str, edge: dict[str, str], stop_at: float, stats: Stats, n: int) -> None:
    headers = {"Authorization": f"Bearer {edge['token']}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60.0) as http:
        while time.monotonic() < stop_at:
            joined = await _call(http, stats, "POST", "/v1/cycles", {200, 201})
            if joined is None:
                continue
            cycle = joined.json()
            spec = FeatureSpec.model_validate(cycle["spec"])
            body = pack_features(*random_rows(spec, 8, seed=n), spec, edge["edge_id"])
            path = f"/v1/cycles/{cycle['id']}/features"
            # 409: the cycle closed (deadline) between joining and uploading; join again.
            put = await _call(http, stats, "PUT", path, {200, 201, 409}, content=body)
            if put is None or put.status_code == 409:
                continue
            state = cycle
            while time.monotonic() < stop_at and state["state"] in ("collecting", "training"):
                await asyncio.sleep(0.5)
                polled = await _call(http, stats, "GET", f"/v1/cycles/{cycle['id']}", {200})
                if polled is not None:
                    state = polled.json()
            if state["state"] != "done":
                continue
            stats.cycles_done.add(state["id"])
            version = state["result_model_version"]
            info = await _call(http, stats, "GET", f"/v1/models/{version}", {200})
            weights = await _call(http, stats, "GET", f"/v1/models/{version}/weights", {200})
            if info is not None and weights is not None:
                if hashlib.sha256(weights.content).hexdigest() != info.json()["sha256"]:
                    stats.errors.append(f"model {version}: weights do not match their sha256")
                stats.downloads += 1


async def _register(url: str, n: int) -> list[dict[str, str]]:
    headers = {"Authorization": f"Bearer {SERVER_ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60.0) as admin:
        edges = []
        for i in range(n):
            response = await admin.post("/v1/edges", json={"name": f"sim-{i:03d}"})
            assert response.status_code == 201, response.text
            edges.append(response.json())
        return edges


async def _run(url: str, stats: Stats, sample_rss: Any) -> None:
    edges = await _register(url, EDGES)
    stop_at = time.monotonic() + DURATION_S
    tasks = [asyncio.create_task(_edge(url, e, stop_at, stats, i)) for i, e in enumerate(edges)]
    while not all(t.done() for t in tasks):
        sample_rss()
        await asyncio.sleep(0.5)
    await asyncio.gather(*tasks)


@pytest.mark.slow
def test_200_concurrent_edges_for_60_seconds(tmp_path: Path) -> None:
    port = free_port()
    stats = Stats()
    with services(tmp_path) as procs:
        server = procs.server(
            tmp_path / "server",
            port,
            min_edges="1",
            cycle_deadline_s="20",
            train_epochs="2",
        )
        baseline_kib = server.rss_kib()
        samples: list[int] = []
        asyncio.run(_run(server.url, stats, lambda: samples.append(server.rss_kib())))
        server.check_alive()
        peak_kib = server.peak_rss_kib()
    report = {
        "edges": EDGES,
        "duration_s": DURATION_S,
        "requests": len(stats.latencies),
        "statuses": dict(sorted(stats.statuses.items())),
        "p50_ms": round(stats.p(0.50) * 1000, 1),
        "p99_ms": round(stats.p(0.99) * 1000, 1),
        "max_ms": round(max(stats.latencies, default=0) * 1000, 1),
        "cycles_done": len(stats.cycles_done),
        "weights_downloaded": stats.downloads,
        "reconnects": stats.reconnects,
        "baseline_rss_mib": round(baseline_kib / 1024, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "errors": stats.errors[:20],
    }
    (tmp_path / "load.json").write_text(json.dumps(report, indent=2))
    print("\nload:", json.dumps(report))
    assert not stats.errors, report
    assert stats.cycles_done and stats.downloads > 0
