"""Real service processes for the hardening tests: start, wait, measure, kill.

A service is started by :mod:`fedinspect.launcher` (as the demo starts it) with its
settings in the environment (nothing inherited from the caller's FEDINSPECT_*
variables), listens on 127.0.0.1, and writes its log to a file that failures show.
Memory is read from ``/proc/<pid>/status``: ``VmRSS`` now, ``VmHWM`` the peak.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from fedinspect.launcher import HOST as HOST  # re-exported: the tests import them from here
from fedinspect.launcher import Service as ServiceKind
from fedinspect.launcher import ServiceProcess
from fedinspect.launcher import free_port as free_port
from tests.integration.processes import split_env

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0

SERVER_ADMIN_TOKEN = "hardening-server-admin-token-0123"
EDGE_ADMIN_TOKEN = "hardening-edge-admin-token-0123"

#: a tiny, fast server: tiny_cnn at 32 px without ImageNet weights
TINY_SERVER_ENV = {
    "FEDINSPECT_SERVER_BACKBONE": "tiny_cnn",
    "FEDINSPECT_SERVER_PRETRAINED": "false",
    "FEDINSPECT_SERVER_INPUT_SIZE": "32",
    "FEDINSPECT_SERVER_HEAD_HIDDEN": "8",
    "FEDINSPECT_SERVER_TRAIN_EPOCHS": "2",
    "FEDINSPECT_SERVER_TRAIN_BATCH_SIZE": "8",
    "FEDINSPECT_SERVER_DEADLINE_CHECK_INTERVAL_S": "0.1",
    # the classes of the hardening image folders, in ImageFolder (sorted) order
    "FEDINSPECT_SERVER_CLASS_NAMES": '["bright", "dark"]',
    # rows on the wire, as the tests' hand-made uploads are (the default sends statistics)
    "FEDINSPECT_SERVER_PRIVACY__MODE": "pooled",
    # one-shot cycles: these tests break stage 2; tests/integration/test_rounds_processes.py
    # breaks the rounds
    "FEDINSPECT_SERVER_ROUNDS": "0",
}


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Service(ServiceProcess):
    """One service process; ``kill()`` is SIGKILL, ``stop()`` a graceful SIGTERM."""

    def __init__(
        self, name: str, service: ServiceKind, env: Mapping[str, str], port: int, log_dir: Path
    ) -> None:
        settings, extra = split_env(env)
        super().__init__(
            name,
            service,
            settings,
            log_dir / f"{name}.log",
            {"OMP_NUM_THREADS": "1", **extra},
            cwd=ROOT,
        )
        self.port = port
        assert self.url == f"http://{HOST}:{port}", self.url

    def log(self, chars: int = 6000) -> str:
        return self.tail(chars)

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S, interval_s: float = 0.1) -> None:
        super().wait_healthy(timeout_s, interval_s)

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def stop(self, timeout_s: float = 15.0) -> None:
        super().stop(timeout_s)


def server_env(data_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    env = {
        "FEDINSPECT_SERVER_ADMIN_TOKEN": SERVER_ADMIN_TOKEN,
        "FEDINSPECT_SERVER_DATA_DIR": str(data_dir),
        "FEDINSPECT_SERVER_HOST": HOST,
        "FEDINSPECT_SERVER_PORT": str(port),
        **TINY_SERVER_ENV,
    }
    env.update({f"FEDINSPECT_SERVER_{k.upper()}": v for k, v in overrides.items()})
    return env


def edge_env(
    data_dir: Path, port: int, server_url: str, token: str, edge_id: str, dataset: Path, **o: str
) -> dict[str, str]:
    env = {
        "FEDINSPECT_EDGE_ADMIN_TOKEN": EDGE_ADMIN_TOKEN,
        "FEDINSPECT_EDGE_SERVER_URL": server_url,
        "FEDINSPECT_EDGE_TOKEN": token,
        "FEDINSPECT_EDGE_EDGE_ID": edge_id,
        "FEDINSPECT_EDGE_NAME": edge_id,
        "FEDINSPECT_EDGE_HOST": HOST,
        "FEDINSPECT_EDGE_PORT": str(port),
        "FEDINSPECT_EDGE_DATA_DIR": str(data_dir),
        "FEDINSPECT_EDGE_DATASET": str(dataset),
        "FEDINSPECT_EDGE_BATCH_SIZE": "16",
        "FEDINSPECT_EDGE_FINETUNE_EPOCHS": "2",
        "FEDINSPECT_EDGE_FINETUNE_VIEWS": "1",
        "FEDINSPECT_EDGE_FINETUNE_AUGMENT": "false",
        "FEDINSPECT_EDGE_FINETUNE_TRAIN_FROM": "b1",
        "FEDINSPECT_EDGE_POLL_INTERVAL_S": "0.2",
        "FEDINSPECT_EDGE_POLL_MAX_INTERVAL_S": "0.5",
        "FEDINSPECT_EDGE_RETRY_BASE_S": "0.2",
        "FEDINSPECT_EDGE_RETRY_MAX_S": "2",
    }
    env.update({f"FEDINSPECT_EDGE_{k.upper()}": v for k, v in o.items()})
    return env


class Services:
    """Every process a test started; all are killed when the test ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Service] = []

    def server(self, data_dir: Path, port: int, name: str = "server", **o: str) -> Service:
        svc = Service(name, "server", server_env(data_dir, port, **o), port, self.log_dir)
        self.started.append(svc)
        svc.wait_healthy()
        return svc

    def edge(self, name: str, port: int, env: Mapping[str, str]) -> Service:
        svc = Service(name, "edge", env, port, self.log_dir)
        self.started.append(svc)
        svc.wait_healthy()
        return svc

    def logs(self, chars: int = 6000) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log(chars)}" for s in self.started)

    def stop_all(self) -> None:
        for svc in reversed(self.started):
            svc.stop()


@contextmanager
def services(log_dir: Path) -> Iterator[Services]:
    started = Services(log_dir)
    try:
        yield started
    finally:
        started.stop_all()


def client(url: str, token: str, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def register_edge(url: str, name: str) -> dict[str, str]:
    with client(url, SERVER_ADMIN_TOKEN) as admin:
        response = admin.post("/v1/edges", json={"name": name})
        assert response.status_code == 201, response.text
        body: dict[str, str] = response.json()
        return body


def wait_until(predicate: object, timeout_s: float, what: str, interval: float = 0.2) -> None:
    """Poll ``predicate()`` until true; AssertionError naming ``what`` after ``timeout_s``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
