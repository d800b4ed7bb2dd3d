"""Server ingest under load: K simulated edges upload feature batches concurrently.

One real server process (EfficientNet-Lite0 cut at ``pooled``: 1280 float32 per row,
as edges send by default) on loopback; K edges registered through the admin API join
one cycle (its quorum is above K, so it keeps collecting) and each uploads
``uploads_per_edge`` different batches of ``rows`` rows, all edges at once (asyncio,
one client and connection each). Each edge's batches are made before the clock starts
(one drawn and privatised batch per edge, then copies that differ in one value), so
the client's time goes to HTTP, not to drawing rows. A 429/503 is answered as a real
edge does: wait ``Retry-After`` and send again; the latency of an upload is what the
edge sees, from its first attempt to the acknowledgement, waits included. Errors are
uploads that failed for good. Peak RSS is the server's ``VmHWM`` after the run (a
fresh process per K); the server's CPU milliseconds per upload (all its threads, while
the uploads ran) say what an upload costs it whatever else runs on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.stats import summary
from fedinspect.launcher import HOST, ServiceProcess, build_settings, free_port
from fl_core.features import pack_features
from fl_core.schemas import Cycle, FeatureSpec
from fl_core.serialization import inspect_header
from server_service.config import Settings as ServerSettings


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system, all threads) a live process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _start_server(work: Path, admin: str, port: int, min_edges: int) -> ServiceProcess:
    settings = build_settings(
        ServerSettings,
        admin_token=admin,
        data_dir=work,
        host=HOST,
        port=port,
        min_edges=min_edges,
        cycle_deadline_s=86400,
        log_level="WARNING",
        # the uploads are feature rows, the largest a server takes: the pooled mode
        privacy={"mode": "pooled"},
    )
    return ServiceProcess("server", "server", settings, work / "server.log")


def _body(spec: FeatureSpec, edge_id: str, rows: int, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn([rows, *spec.feature_shape], generator=gen).abs()
    labels = torch.arange(rows) % len(spec.class_names)
    return pack_features(feats, labels, spec, edge_id)


def variant(body: bytes, i: int) -> bytes:
    """``body`` (an upload of float32 rows) with its first value shrunk by a factor that
    depends on ``i``: different bytes for each ``i``, a row norm no larger, so a batch the
    server accepted stays acceptable. Costs a copy, not the tens of milliseconds of
    drawing and privatising 300 new rows."""
    header, _meta = inspect_header(body)
    (header_len,) = struct.unpack("<Q", body[:8])
    offsets = header["features"]["data_offsets"]
    assert isinstance(offsets, list) and header["features"]["dtype"] == "F32"
    at = 8 + header_len + int(offsets[0])
    out = bytearray(body)
    (first,) = struct.unpack_from("<f", out, at)
    struct.pack_into("<f", out, at, first * (1 - (i + 1) * 1e-5))
    return bytes(out)


async def _call(
    client: httpx.AsyncClient, method: str, path: str, out: dict[str, Any], **kwargs: Any
) -> httpx.Response:
    """One request, sent again after 429/503 (Retry-After) or a dropped connection, as a
    real edge does."""
    resp: httpx.Response | None = None
    for _attempt in range(50):
        try:
            resp = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            out["transport_errors"] += 1
            out["last_error"] = type(exc).__name__
            await asyncio.sleep(0.5)
            continue
        if resp.status_code not in (429, 503):
            return resp.raise_for_status()
        out["retries"] += 1
        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
    if resp is None:
        raise RuntimeError(f"{method} {path}: no answer in 50 tries ({out['last_error']})")
    return resp.raise_for_status()


async def _edge(
    client: httpx.AsyncClient,
    token: str,
    edge_id: str,
    uploads: int,
    rows: int,
    cycle: Cycle,
    out: dict[str, Any],
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    template = out["bodies"][edge_id]  # made before the clock started
    for i in range(uploads):
        body = variant(template, i)
        began = time.perf_counter()
        for _attempt in range(20):
            try:
                resp = await client.put(
                    f"/v1/cycles/{cycle.id}/features",
                    content=body,
                    headers={**headers, "Content-Type": "application/octet-stream"},
                )
            except httpx.TransportError as exc:
                out["transport_errors"] += 1
                out["last_error"] = f"{type(exc).__name__}"
                await asyncio.sleep(0.5)
                continue
            if resp.status_code in (429, 503):
                out["retries"] += 1
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            if resp.status_code in (200, 201):
                out["latencies"].append(time.perf_counter() - began)
                out["bytes"] += len(body)
            else:
                out["errors"] += 1
                out["last_error"] = f"{resp.status_code} {resp.text[:200]}"
            break
        else:
            out["errors"] += 1


async def _load(
    url: str,
    admin: str,
    edges: int,
    uploads: int,
    rows: int,
    edge: Any = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Register ``edges`` edges, join them to one cycle, then run ``edge`` (default:
    :func:`_edge`, whose bodies are made before the clock starts) for all of them at
    once, each edge on its own client and connection, as separate factories would.
    With ``server_pid``, the server's CPU seconds while the uploads ran (all threads)."""
    timeout = httpx.Timeout(300.0)
    out: dict[str, Any] = {
        "latencies": [],
        "bytes": 0,
        "errors": 0,
        "retries": 0,
        "transport_errors": 0,
        "last_error": None,
        "bodies": {},
    }
    async with contextlib.AsyncExitStack() as stack:
        admin_client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=timeout)
        )
        tokens = []
        admin_headers = {"Authorization": f"Bearer {admin}"}
        for i in range(edges):
            resp = await _call(
                admin_client,
                "POST",
                "/v1/edges",
                out,
                json={"name": f"bench-{i}"},
                headers=admin_headers,
            )
            reg = resp.json()
            tokens.append((reg["token"], reg["edge_id"]))
        # One client (one connection) per edge: a shared pool of hundreds of connections
        # spends the client's CPU looking for an idle one, which is not the server's cost.
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=1)
                )
            )
            for _ in tokens
        ]
        joins = await asyncio.gather(
            *(
                _call(c, "POST", "/v1/cycles", out, headers={"Authorization": f"Bearer {t}"})
                for c, (t, _) in zip(clients, tokens, strict=True)
            )
        )
        cycles = [Cycle.model_validate_json(r.content) for r in joins]
        if edge is None:
            edge = _edge
            for (_t, e), c in zip(tokens, cycles, strict=True):
                out["bodies"][e] = _body(c.spec, e, rows, seed=hash(e) % 2**31)
        out["retries"] = out["transport_errors"] = 0  # the uploads' only, not the joins'
        cpu_before = _cpu_s(server_pid) if server_pid else None
        began = time.perf_counter()
        await asyncio.gather(
            *(
                edge(client, t, e, uploads, rows, c, out)
                for client, (t, e), c in zip(clients, tokens, cycles, strict=True)
            )
        )
        out["wall_s"] = time.perf_counter() - began
        if server_pid and cpu_before is not None:
            out["server_cpu_s"] = _cpu_s(server_pid) - cpu_before
        del out["bodies"]
        return out


def run_level(edges: int, uploads: int, rows: int) -> dict[str, Any]:
    admin = secrets.token_urlsafe(24)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fedinspect-ingest-") as tmp:
        proc = _start_server(Path(tmp), admin, port, min_edges=edges + 1)
        try:
            proc.wait_healthy(timeout_s=180)
            out = asyncio.run(_load(proc.url, admin, edges, uploads, rows, server_pid=proc.pid))
            peak = _peak_rss_mb(proc.pid)
        finally:
            proc.stop(timeout_s=20)
    lat_ms = sorted(1000 * x for x in out["latencies"])
    done = len(lat_ms)

    def pct(q: float) -> float | None:
        return round(lat_ms[min(done - 1, int(q * done))], 1) if done else None

    return {
        "edges": edges,
        "uploads": done,
        "rows_per_upload": rows,
        "upload_bytes": round(out["bytes"] / max(1, done)),
        "uploads_per_s": round(done / out["wall_s"], 2),
        "mb_per_s": round(out["bytes"] / 1e6 / out["wall_s"], 2),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(lat_ms), 1) if lat_ms else None,
        "errors": out["errors"] + 0,
        "retries_429_503": out["retries"],
        "transport_errors_retried": out["transport_errors"],
        "last_error": out["last_error"],
        "peak_rss_mb": peak,
        # what one upload costs the server's process, whatever else runs on the machine
        "server_cpu_ms_per_upload": round(1000 * out["server_cpu_s"] / max(1, done), 1),
        "wall_s": round(out["wall_s"], 2),
    }


def run(quick: bool) -> list[dict[str, Any]]:
    levels = [10, 50, 200]
    uploads, rows = (2, 300) if quick else (5, 300)
    repeats = 1 if quick else 3
    results = []
    for k in levels:
        runs = [run_level(k, uploads, rows) for _ in range(repeats)]
        best = sorted(runs, key=lambda r: r["uploads_per_s"])[len(runs) // 2]
        best = dict(best)
        best["uploads_per_s_runs"] = summary([r["uploads_per_s"] for r in runs], 2)
        best["p99_ms_runs"] = summary([r["p99_ms"] or 0 for r in runs], 1)
        results.append(best)
    return results


__all__ = ["run", "run_level"]
