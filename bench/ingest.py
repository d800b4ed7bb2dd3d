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

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.stats import fmt, summary, write_results
from fedinspect.launcher import HOST, ServiceProcess, build_settings, free_port
from fl_core.blobstore import LocalBlobStore
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


def _start_server(
    work: Path, admin: str, port: int, min_edges: int, tree: Path | None = None
) -> ServiceProcess:
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
    if tree is None:
        return ServiceProcess("server", "server", settings, work / "server.log")
    # the server's packages from ``tree``: first on the path, before the installed ones
    return ServiceProcess(
        "server",
        "server",
        settings,
        work / "server.log",
        extra_env={"PYTHONPATH": str(tree)},
        cwd=tree,
    )


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


def run_level(edges: int, uploads: int, rows: int, tree: Path | None = None) -> dict[str, Any]:
    """One load of ``edges`` edges on a fresh server (run from the source ``tree``, by
    default this one)."""
    admin = secrets.token_urlsafe(24)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fedinspect-ingest-") as tmp:
        proc = _start_server(Path(tmp), admin, port, min_edges=edges + 1, tree=tree)
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


# ------------------------------------------------------------------ what the machine allows


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app that reads a request's body and answers 201: what uvicorn on
    loopback moves with nothing of FedInspect in the way."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b'{"size": %d}' % size
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _echo_load(url: str, edges: int, uploads: int, size: int) -> dict[str, Any]:
    bodies = [os.urandom(size) for _ in range(8)]
    latencies: list[float] = []

    async def edge(i: int) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
            for j in range(uploads):
                began = time.perf_counter()
                resp = await client.put("/", content=bodies[(i + j) % len(bodies)])
                resp.raise_for_status()
                latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(edge(i) for i in range(edges)))
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "edges": edges,
        "uploads_per_s": round(len(latencies) / wall, 1),
        "mb_per_s": round(len(latencies) * size / 1e6 / wall, 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def loopback_ceiling(edges: int, uploads: int, size: int) -> dict[str, Any]:
    """Uploads of ``size`` bytes per second through a bare uvicorn echo app (its own
    process, as the server is) from the same kind of client."""
    port = free_port()
    code = (
        "import uvicorn; from bench.ingest import echo_app; "
        f"uvicorn.run(echo_app, host={HOST!r}, port={port}, log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.put(f"http://{HOST}:{port}/", content=b"x", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the echo server did not start") from None
                time.sleep(0.1)
        return asyncio.run(_echo_load(f"http://{HOST}:{port}", edges, uploads, size))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def disk_ceiling(size: int, blobs: int = 60, threads: int = 4) -> dict[str, Any]:
    """Blobs of ``size`` bytes per second through the server's own blob store (each
    written, fsynced, renamed, its folder fsynced), from ``threads`` threads as from
    the server's upload slots, into a temporary folder beside the benchmark's."""
    bodies = [os.urandom(size) for _ in range(blobs)]
    with tempfile.TemporaryDirectory(prefix="fedinspect-ingest-disk-") as tmp:
        store = LocalBlobStore(Path(tmp))
        began = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(store.put, bodies))
        wall = time.perf_counter() - began
    return {
        "threads": threads,
        "blobs_per_s": round(blobs / wall, 1),
        "mb_per_s": round(blobs * size / 1e6 / wall, 1),
    }


# ------------------------------------------------------------------ before and after

RESULTS = Path(__file__).resolve().parent / "results" / "ingest"
ROOT = Path(__file__).resolve().parents[1]
#: the two servers of a comparison, in the order each repeat runs them
SIDES = ("ref", "current")
#: per-run figures summarised for each side (median, min, max)
FIGURES = ("uploads_per_s", "p99_ms", "p50_ms", "server_cpu_ms_per_upload")


@contextlib.contextmanager
def ref_tree(rev: str) -> Iterator[tuple[Path, str]]:
    """A detached ``git worktree`` of ``rev`` (removed after), and its commit."""
    commit = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="fedinspect-ingest-ref-") as tmp:
        tree = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", str(tree), commit)
        try:
            yield tree, commit
        finally:
            _git("worktree", "remove", "--force", str(tree))


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def compare(
    trees: dict[str, Path],
    levels: Sequence[int],
    repeats: int,
    uploads: int,
    rows: int,
    run: Callable[..., dict[str, Any]] = run_level,
) -> list[dict[str, Any]]:
    """Each level ``repeats`` times, the sides alternating (ref, current, ref, ...), so
    that a change of the machine's load hits both; one row per run."""
    runs = []
    for edges in levels:
        for repeat in range(repeats):
            for side in SIDES:
                row = run(edges, uploads, rows, tree=trees[side])
                runs.append({"side": side, "repeat": repeat, **row})
                print(
                    f"{edges} edges, {side}: {row['uploads_per_s']} uploads/s, "
                    f"p99 {row['p99_ms']} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def compare_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level, each side's figures as median (min-max) over its runs."""
    levels = sorted({r["edges"] for r in runs})
    rows = []
    for edges in levels:
        row: dict[str, Any] = {"edges": edges}
        for side in SIDES:
            mine = [r for r in runs if r["edges"] == edges and r["side"] == side]
            row[side] = {
                **{f: summary([r[f] for r in mine if r[f] is not None], 1) for f in FIGURES},
                "errors": sum(r["errors"] for r in mine),
                "retries_429_503": sum(r["retries_429_503"] for r in mine),
            }
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Ingest on one replica: before and after, same run",
        "",
        f"`{meta['command']}` on {meta['cpus']} CPU cores ({meta['machine']}), "
        f"{meta['date']}; load average {meta['load_before']} before, {meta['load_after']} "
        f"after (a shared machine). One server process on loopback, SQLite and the file "
        f"blob store; each edge uploads {meta['uploads_per_edge']} batches of "
        f"{meta['rows']} rows x 1280 float32 ({meta['upload_mb']} MB). `ref` is the "
        f"server of {meta['ref']} (commit {meta['ref_commit']}), `current` that of commit "
        f"{meta['current_commit']}; the client is the same. Each level ran "
        f"{meta['repeats']} times per side, the sides alternating; figures are median "
        "(min-max). p99 is the edge's view, 503 waits and retries included; CPU is the "
        "server process's, all threads, per upload.",
        "",
        "| edges | uploads/s ref | uploads/s current | p99 ms ref | p99 ms current "
        "| server CPU ms/upload ref | current | errors | 429/503 retried ref / current |",
        "|---:|---|---|---|---|---|---|---:|---|",
    ]
    for r in results["levels"]:
        a, b = r["ref"], r["current"]
        lines.append(
            f"| {r['edges']} | {fmt(a['uploads_per_s'])} | {fmt(b['uploads_per_s'])} "
            f"| {fmt(a['p99_ms'])} | {fmt(b['p99_ms'])} "
            f"| {fmt(a['server_cpu_ms_per_upload'])} | {fmt(b['server_cpu_ms_per_upload'])} "
            f"| {a['errors'] + b['errors']} | {a['retries_429_503']} / {b['retries_429_503']} |"
        )
    ceilings = results.get("ceilings") or {}
    if ceilings:
        echo, disk = ceilings["loopback"], ceilings["disk"]
        lines += [
            "",
            f"What the machine allows, measured after the runs: a bare uvicorn app that only "
            f"reads the body (its own process, the same client) took {echo['uploads_per_s']} "
            f"uploads/s ({echo['mb_per_s']} MB/s) at {echo['edges']} edges, p99 "
            f"{echo['p99_ms']} ms; the server's blob store wrote {disk['blobs_per_s']} "
            f"fsynced blobs/s of that size ({disk['mb_per_s']} MB/s) from "
            f"{disk['threads']} threads.",
        ]
    notes = results.get("notes") or []
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="Ingest on one replica, the server of another revision against this "
        "tree's, in one run.",
    )
    parser.add_argument("--compare-ref", required=True, help="git revision of the `ref` server")
    parser.add_argument("--edges", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uploads", type=int, default=5, help="uploads per edge")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", action="append", default=[], help="a line under the table")
    parser.add_argument(
        "--no-ceilings",
        action="store_true",
        help="skip the loopback (bare uvicorn echo) and disk (fsynced blobs) ceilings",
    )
    args = parser.parse_args(argv)
    load_before = [round(v, 2) for v in os.getloadavg()]
    with ref_tree(args.compare_ref) as (tree, ref_commit):
        runs = compare(
            {"ref": tree, "current": ROOT}, args.edges, args.repeats, args.uploads, args.rows
        )
    size = runs[0]["upload_bytes"] if runs else 1_538_728
    ceilings = (
        {}
        if args.no_ceilings
        else {
            "loopback": loopback_ceiling(max(args.edges), args.uploads, size),
            "disk": disk_ceiling(size),
        }
    )
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    results = {
        "meta": {
            "section": "ingest",
            "command": "python -m bench.ingest "
            + " ".join(
                [
                    f"--compare-ref {args.compare_ref}",
                    "--edges " + " ".join(map(str, args.edges)),
                    f"--repeats {args.repeats} --uploads {args.uploads} --rows {args.rows}",
                ]
            ),
            "ref": args.compare_ref,
            "ref_commit": ref_commit,
            "current_commit": _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "load_before": load_before,
            "load_after": [round(v, 2) for v in os.getloadavg()],
            "uploads_per_edge": args.uploads,
            "rows": args.rows,
            "upload_mb": round(runs[0]["upload_bytes"] / 1e6, 2) if runs else None,
            "repeats": args.repeats,
        },
        "levels": compare_rows(runs),
        "ceilings": ceilings,
        "raw_runs": runs,
        "notes": args.note,
    }
    page = markdown(results)
    write_results(args.out, results, page)
    print(page)


if __name__ == "__main__":
    main()


__all__ = [
    "compare",
    "compare_rows",
    "disk_ceiling",
    "echo_app",
    "loopback_ceiling",
    "main",
    "markdown",
    "ref_tree",
    "run",
    "run_level",
]
