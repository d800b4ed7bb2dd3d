"""A scaled-out server on loopback for tests: N ``fedinspect server`` replicas on one
PostgreSQL database and one S3 bucket (moto), behind haproxy (Debian's package), and
simulated edges that talk to the load balancer through the edge's own retrying client.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import httpx

from edge_service.services.client import RetryPolicy, ServerClient
from tests.integration.processes import HOST, Process, free_port, wait_healthy
from tests.server_service.helpers import ADMIN, ADMIN_TOKEN
from tests.services import S3_ENV, PostgresServer, S3Server

#: a tiny model that trains in a moment (as in the server's unit tests)
TINY = {
    "FEDINSPECT_SERVER_BACKBONE": "tiny_cnn",
    "FEDINSPECT_SERVER_PRETRAINED": "false",
    "FEDINSPECT_SERVER_INPUT_SIZE": "32",
    "FEDINSPECT_SERVER_HEAD_HIDDEN": "8",
    "FEDINSPECT_SERVER_TRAIN_EPOCHS": "2",
    "FEDINSPECT_SERVER_TRAIN_BATCH_SIZE": "8",
    "FEDINSPECT_SERVER_PRIVACY__MODE": "pooled",
    "FEDINSPECT_SERVER_PRIVACY__NOISE_SIGMA": "0",
    "FEDINSPECT_SERVER_ROUNDS": "0",  # one-shot cycles (test_rounds_processes has rounds)
    "FEDINSPECT_SERVER_LEASE_TTL_S": "3",
    "FEDINSPECT_SERVER_DEADLINE_CHECK_INTERVAL_S": "0.2",
    "FEDINSPECT_SERVER_CYCLE_DEADLINE_S": "300",
}

_HAPROXY = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # a replica that dies mid-request: try another (bodies here are small enough to
    # be replayed); the edges' own retries cover the rest
    retries 3
    option redispatch
    retry-on conn-failure empty-response junk-response
    # uvicorn closes a connection idle for 5 s; a request haproxy sends on a pooled
    # connection as it closes came back 502 (about 1 in 500 under load): a new
    # connection per request costs a handshake on the local network, no errors
    http-reuse never
frontend fedinspect
    bind {host}:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server inter 300ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(found).is_file():
        raise AssertionError("haproxy is not installed: apt-get install haproxy (see .ci/run)")
    return found


class Cluster:
    """Replicas r1..rN, haproxy in front; every process's log kept in ``log_dir``."""

    def __init__(
        self,
        log_dir: Path,
        postgres: PostgresServer,
        s3: S3Server,
        replicas: int = 3,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.database_url = postgres.create_database()
        self.bucket = f"fedinspect-{uuid.uuid4().hex[:8]}"
        self.env = {
            **S3_ENV,
            **TINY,
            "FEDINSPECT_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
            "FEDINSPECT_SERVER_DATABASE_URL": self.database_url,
            "FEDINSPECT_SERVER_BLOB_URL": f"s3://{self.bucket}/server",
            "FEDINSPECT_SERVER_S3_ENDPOINT_URL": s3.endpoint,
            "FEDINSPECT_SERVER_HOST": HOST,
            # only the SQLite default would live here: nothing must be written to it
            "FEDINSPECT_SERVER_DATA_DIR": str(log_dir / "data"),
            **(env or {}),
        }
        self.ports = {f"r{i + 1}": free_port() for i in range(replicas)}
        self.procs: dict[str, Process] = {}
        self.incarnations: dict[str, int] = dict.fromkeys(self.ports, 0)
        self.lb_port = free_port()
        self.lb: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.lb_port}"

    def replica_url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    def start_replica(self, name: str) -> Process:
        self.incarnations[name] += 1
        proc = Process(
            f"{name}-{self.incarnations[name]}",
            "server",
            {
                **self.env,
                "FEDINSPECT_SERVER_PORT": str(self.ports[name]),
                "FEDINSPECT_SERVER_REPLICA_ID": name,
            },
            self.log_dir,
        )
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.proc.kill()
        proc.proc.wait(timeout=30)
        proc.stop()

    def start(self) -> None:
        # The first replica creates the schema and the base model; the others then
        # start at once, as a rolling deployment would.
        first = next(iter(self.ports))
        wait_healthy(self.replica_url(first), self.start_replica(first), timeout=120)
        rest = [n for n in self.ports if n != first]
        for name in rest:
            self.start_replica(name)
        for name in rest:
            wait_healthy(self.replica_url(name), self.procs[name], timeout=120)
        servers = "\n".join(
            f"    server {name} {HOST}:{port} check" for name, port in self.ports.items()
        )
        config = self.log_dir / "haproxy.cfg"
        config.write_text(_HAPROXY.format(host=HOST, port=self.lb_port, servers=servers))
        command = [haproxy_binary(), "-f", str(config), "-db"]
        with (self.log_dir / "haproxy.log").open("wb") as log:
            self.lb = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.lb.poll() is not None:
                raise AssertionError((self.log_dir / "haproxy.log").read_text())
            time.sleep(0.1)
        raise AssertionError("haproxy did not answer in 30 s")

    def stop(self) -> None:
        if self.lb is not None and self.lb.poll() is None:
            self.lb.terminate()
            self.lb.wait(timeout=10)
        for proc in self.procs.values():
            proc.stop()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("r*-*.log"))
        )

    def events(self, event: str) -> list[dict[str, str]]:
        """Every logged ``event=<event>`` line of every replica, as key/value dicts."""
        out = []
        for line in self.logs().splitlines():
            if f"event={event} " in line or line.endswith(f"event={event}"):
                out.append(dict(re.findall(r"(\w+)=('[^']*'|\S+)", line)))
        return out

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=ADMIN, timeout=30)

    def edge_client(self, token: str, budget_s: float = 120.0) -> ServerClient:
        http = httpx.Client(base_url=self.url, timeout=30, transport=httpx.HTTPTransport(retries=0))
        return ServerClient(http, token, RetryPolicy(budget_s, 0.1, 1.0))


__all__ = ["TINY", "Cluster", "haproxy_binary"]
