"""Real service processes for the hardening tests: start, wait, measure, kill.

A service runs as ``python -c "from <service>.main import run; run()"`` with its
settings in the environment (nothing inherited from the caller's FEDINSPECT_*
variables), listens on 127.0.0.1, and writes its log to a file that failures show.
Memory is read from ``/proc/<pid>/status``: ``VmRSS`` now, ``VmHWM`` the peak.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
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
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Service:
    """One service process; ``kill()`` is SIGKILL, ``stop()`` a graceful SIGTERM."""

    def __init__(
        self, name: str, module: str, env: Mapping[str, str], port: int, log_dir: Path
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        base = {k: v for k, v in os.environ.items() if not k.startswith("FEDINSPECT_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from {module}.main import run; run()"],
            cwd=ROOT,
            env={**base, "OMP_NUM_THREADS": "1", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, chars: int = 6000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"{self.name} exited with {code}:\n{self.log()}")

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy after {timeout_s}s:\n{self.log()}")

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a power cut or the OOM killer."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


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
        svc = Service(name, "server_service", server_env(data_dir, port, **o), port, self.log_dir)
        self.started.append(svc)
        svc.wait_healthy()
        return svc

    def edge(self, name: str, port: int, env: Mapping[str, str]) -> Service:
        svc = Service(name, "edge_service", env, port, self.log_dir)
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
