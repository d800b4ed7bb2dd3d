"""Ingest of the scaled-out server: N simulated edges through one replica and through
three, in the same run (``python -m bench.scaleout --edges 1000``).

Each phase starts its own replicas (1, then 3) on one PostgreSQL cluster and one S3
API server, behind haproxy, all on loopback, with the machinery of the replica tests
(tests/services.py, tests/integration/replicas.py: this bench runs from a checkout).
The edges are async clients in this process (one connection each, bounded by the
edge count, each call bounded by a timeout), registered through the admin API; they
join one cycle whose quorum is above N, so it keeps collecting, and upload one small
feature batch each, all at once. Like a real edge (edge_service's client), an edge
retries 429/5xx answers (after ``Retry-After``) and dropped connections, within a
retry budget (``--budget-s``, 300 s; the edge's default is 120 s). Latency is what an
edge sees, waits included; errors are uploads that failed for good (an answer that is
not retried, or the budget spent). Peak RSS is each replica's ``VmHWM`` at the end of
its phase.

Writes bench/results/scaleout/results.json and results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.ingest import _body, _load, _peak_rss_mb
from tests.integration.replicas import Cluster
from tests.server_service.helpers import ADMIN_TOKEN
from tests.services import PostgresServer, S3Server

RESULTS = Path(__file__).resolve().parent / "results" / "scaleout"
#: answers a real edge retries (edge_service.services.client)
_RETRIED = frozenset({429, 500, 502, 503, 504})


def _edge_like(budget_s: float) -> Any:
    """bench.ingest's per-edge upload loop, retrying as edge_service's client does."""

    async def edge(
        client: httpx.AsyncClient,
        token: str,
        edge_id: str,
        uploads: int,
        rows: int,
        cycle: Any,
        out: dict[str, Any],
    ) -> None:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        for i in range(uploads):
            body = _body(cycle.spec, edge_id, rows, seed=hash((edge_id, i)) % 2**31)
            began = time.perf_counter()
            while True:
                wait = 0.5
                try:
                    resp = await client.put(
                        f"/v1/cycles/{cycle.id}/features", content=body, headers=headers
                    )
                except httpx.TransportError as exc:
                    out["transport_errors"] += 1
                    out["last_error"] = type(exc).__name__
                else:
                    if resp.status_code in (200, 201):
                        out["latencies"].append(time.perf_counter() - began)
                        out["bytes"] += len(body)
                        break
                    if resp.status_code not in _RETRIED:
                        out["errors"] += 1
                        out["last_error"] = f"{resp.status_code} {resp.text[:200]}"
                        break
                    out["retries"] += 1
                    out.setdefault("retried_statuses", {}).setdefault(resp.status_code, 0)
                    out["retried_statuses"][resp.status_code] += 1
                    wait = float(resp.headers.get("Retry-After", "1"))
                if time.perf_counter() - began + wait > budget_s:
                    out["errors"] += 1
                    out["last_error"] = f"retry budget of {budget_s:.0f} s spent"
                    break
                await asyncio.sleep(wait)

    return edge


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, children: bool = True) -> float:
    """CPU seconds of a process (and of its children that exited, when asked)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + ((cutime + cstime) if children else 0)) / _TICK


def _postgres_cpu_s(postgres: PostgresServer) -> float:
    """The cluster's CPU seconds: the postmaster, its exited and its live backends."""
    postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
    total = _cpu_s(postmaster)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            total += _cpu_s(int(stat.parent.name), children=False)
    return total


def _cpu_snapshot(cluster: Cluster, postgres: PostgresServer, s3: S3Server) -> dict[str, float]:
    own = os.times()
    snap = {name: _cpu_s(p.proc.pid) for name, p in cluster.procs.items()}
    snap["postgres"] = _postgres_cpu_s(postgres)
    snap["s3 (moto)"] = _cpu_s(s3.proc.pid) if s3.proc else 0.0
    snap["haproxy"] = _cpu_s(cluster.lb.pid) if cluster.lb else 0.0
    snap["edges (bench process)"] = own.user + own.system
    return snap


def run_phase(
    work: Path,
    postgres: PostgresServer,
    s3: S3Server,
    replicas: int,
    edges: int,
    rows: int,
    budget_s: float = 300.0,
) -> dict[str, Any]:
    log_dir = work / f"replicas-{replicas}"
    log_dir.mkdir()
    cluster = Cluster(
        log_dir,
        postgres,
        s3,
        replicas=replicas,
        env={
            "FEDINSPECT_SERVER_MIN_EDGES": str(edges + 1),
            "FEDINSPECT_SERVER_CYCLE_DEADLINE_S": "86400",
            "FEDINSPECT_SERVER_LOG_LEVEL": "WARNING",
        },
    )
    try:
        cluster.start()
        before = _cpu_snapshot(cluster, postgres, s3)
        out = asyncio.run(
            _load(cluster.url, ADMIN_TOKEN, edges, 1, rows, edge=_edge_like(budget_s))
        )
        after = _cpu_snapshot(cluster, postgres, s3)
        peaks = {name: _peak_rss_mb(p.proc.pid) for name, p in cluster.procs.items()}
    finally:
        cluster.stop()
    lat_ms = sorted(1000 * x for x in out["latencies"])
    done = len(lat_ms)

    def pct(q: float) -> float | None:
        return round(lat_ms[min(done - 1, int(q * done))], 1) if done else None

    return {
        "replicas": replicas,
        "edges": edges,
        "uploads": done,
        "rows_per_upload": rows,
        "upload_bytes": round(out["bytes"] / max(1, done)),
        "uploads_per_s": round(done / out["wall_s"], 2),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(lat_ms), 1) if lat_ms else None,
        "errors": out["errors"],
        "retries_429_5xx": out["retries"],
        "retried_statuses": out.get("retried_statuses", {}),
        "transport_errors_retried": out["transport_errors"],
        "last_error": out["last_error"],
        "peak_rss_mb": peaks,
        "wall_s": round(out["wall_s"], 2),
        # over the whole phase (registration and joins too), so shares, not per upload
        "cpu_s": {k: round(after[k] - before.get(k, 0.0), 1) for k in after},
    }


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Ingest through one replica and through three",
        "",
        f"`{meta['command']}` on {meta['cpus']} CPU cores ({meta['machine']}), "
        f"{meta['date']}. PostgreSQL 15, moto's S3 server and haproxy on loopback; "
        "the edges are async clients in the bench's own process.",
        "",
        "| replicas | edges | uploads | bytes each | uploads/s | p50 ms | p99 ms | errors "
        "| retried answers | peak RSS per replica (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peaks = ", ".join(f"{k} {v}" for k, v in r["peak_rss_mb"].items())
        lines.append(
            f"| {r['replicas']} | {r['edges']} | {r['uploads']} | {r['upload_bytes']} "
            f"| {r['uploads_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} "
            f"| {r['retries_429_5xx']} | {peaks} |"
        )
    lines += [
        "",
        "CPU seconds spent by each process over the phase (registering the edges, joining "
        "the cycle and uploading):",
        "",
        "| replicas | " + " | ".join(rows[-1]["cpu_s"]) + " |",
        "|---|" + "---|" * len(rows[-1]["cpu_s"]),
    ]
    for r in rows:
        cells = " | ".join(str(r["cpu_s"].get(k, "")) for k in rows[-1]["cpu_s"])
        lines.append(f"| {r['replicas']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    postgres = PostgresServer()
    postgres.start()
    with tempfile.TemporaryDirectory(prefix="fedinspect-scaleout-") as tmp:
        s3 = S3Server(Path(tmp))
        s3.start()
        try:
            rows = [run_phase(Path(tmp), postgres, s3, n, args.edges, args.rows) for n in (1, 3)]
        finally:
            s3.stop()
            postgres.close()
    meta = {
        "command": f"python -m bench.scaleout --edges {args.edges} --rows {args.rows} "
        f"--budget-s {args.budget_s:g}",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "results.md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))


if __name__ == "__main__":
    main()
