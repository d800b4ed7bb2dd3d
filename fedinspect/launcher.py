"""Starting server and edge processes: the one way the demo, the benchmarks and the
tests do it.

A service runs as ``python -c "from <service>.main import run; run()"`` and reads its
settings from ``FEDINSPECT_SERVER_*`` / ``FEDINSPECT_EDGE_*`` variables. The child's
environment is built, never inherited: a few basics of the caller's (PATH, HOME, the
locale, temp and cache folders, thread counts), then the variables rendered from the
settings the caller passes, then whatever else the caller names (``extra``, which may
not carry ``FEDINSPECT_*``). A ``FEDINSPECT_EDGE_EXTRACT_BACKEND`` left in a user's
shell therefore never changes what a started edge does.

Each process writes its output to a log file that errors quote; a :class:`Processes`
group (``with running(log_dir) as procs``) stops every process it started on exit,
error or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings, EnvSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

HOST = "127.0.0.1"

Service = Literal["server", "edge"]

#: the package and the variables' prefix of each service
SERVICES: dict[str, tuple[str, str]] = {
    "server": ("server_service", "FEDINSPECT_SERVER_"),
    "edge": ("edge_service", "FEDINSPECT_EDGE_"),
}

#: the caller's variables a child keeps: what any program needs to run (and to find the
#: installed packages, caches and a sane thread count), nothing that configures FedInspect
BASIC_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)

S = TypeVar("S", bound=BaseSettings)


def free_port() -> int:
    """A port nothing listens on now, on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def service_command(service: Service) -> list[str]:
    """The command line that runs ``service`` with this interpreter."""
    module, _prefix = SERVICES[service]
    return [sys.executable, "-c", f"from {module}.main import run; run()"]


def _env_prefix(cls: type[BaseSettings]) -> str:
    return str(cls.model_config.get("env_prefix", ""))


def settings_from_env(cls: type[S], env: Mapping[str, str]) -> S:
    """``cls`` read from exactly the variables in ``env``, as the started process will
    read them, never from this process's environment."""
    source = EnvSettingsSource(cls)
    source.env_vars = parse_env_vars(
        env, source.case_sensitive, source.env_ignore_empty, source.env_parse_none_str
    )
    return cls(_build_sources=((source,), {}))


def build_settings(cls: type[S], **values: Any) -> S:
    """``cls`` from these field values alone (``admin_token="..."``, ``port=8001``),
    validated as if read from the environment, never reading this process's."""
    prefix = _env_prefix(cls)
    return settings_from_env(cls, {prefix + k.upper(): _env_value(v) for k, v in values.items()})


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, list | dict | tuple):
        return json.dumps(value)
    return str(value)


def settings_env(settings: BaseSettings) -> dict[str, str]:
    """The variables that make a service read ``settings``: each field the settings were
    given explicitly (others keep their defaults), secrets in clear, nested models and
    lists as JSON. ``settings_from_env(type(s), settings_env(s)) == s``."""
    prefix = _env_prefix(type(settings))
    env = {}
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is None:
            if type(settings).model_fields[name].get_default(call_default_factory=True) is None:
                continue  # unset is the default
            raise ValueError(f"{prefix}{name.upper()} cannot be unset through the environment")
        env[prefix + name.upper()] = _env_value(value)
    return env


def child_env(
    settings: BaseSettings | Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A started service's whole environment: the basics of ``parent`` (default: this
    process's environment; see :data:`BASIC_ENV`, plus ``LC_*``), the variables of
    ``settings`` (a settings object, or its ``FEDINSPECT_*`` variables as a mapping),
    then ``extra``. Nothing else of ``parent`` passes, its ``FEDINSPECT_*`` least of all."""
    parent = os.environ if parent is None else parent
    env = {k: v for k, v in parent.items() if k in BASIC_ENV or k.startswith("LC_")}
    if isinstance(settings, BaseSettings):
        values = settings_env(settings)
    else:
        values = dict(settings)
        stray = sorted(k for k in values if not k.startswith("FEDINSPECT_"))
        if stray:
            raise ValueError(f"not a FedInspect setting: {', '.join(stray)} (pass it as extra)")
    for key in extra or {}:
        if key.startswith("FEDINSPECT_"):
            raise ValueError(f"{key} is a setting: pass it with the settings, not as extra")
    return {**env, **values, **(extra or {}), "PYTHONUNBUFFERED": "1"}


class ServiceProcess:
    """One started service, its output in ``log_path``; ``stop()`` is a graceful SIGTERM
    (SIGKILL after ``stop_timeout_s``), ``kill()`` a SIGKILL."""

    def __init__(
        self,
        name: str,
        service: Service,
        settings: BaseSettings | Mapping[str, str],
        log_path: Path,
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.service = service
        self.log_path = log_path
        self.env = child_env(settings, extra_env)
        prefix = SERVICES[service][1]
        host = self.env.get(prefix + "HOST", HOST)
        port = self.env.get(prefix + "PORT", "8000" if service == "server" else "8100")
        self.url = f"http://{host}:{port}"
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            service_command(service),
            cwd=cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # own process group: Ctrl-C reaches the caller, which then stops it in order
            start_new_session=new_session,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def tail(self, chars: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise ServiceExited(f"{self.name} exited with {code}:\n{self.tail()}")

    def wait_healthy(self, timeout_s: float = 120.0, interval_s: float = 0.2) -> None:
        """Wait until ``GET /health`` answers 200; :class:`ServiceExited` if the process
        ends first, :class:`TimeoutError` (with the log's tail) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(interval_s)
        raise TimeoutError(
            f"{self.name} ({self.url}) not healthy after {timeout_s:.0f} s:\n{self.tail()}"
        )

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a power cut or the OOM killer."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()


class ServiceExited(RuntimeError):
    """A started service ended while it was expected to run."""


class Processes:
    """The services one run started; each is stopped by :meth:`stop_all`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, ServiceProcess] = {}

    def start(
        self,
        name: str,
        service: Service,
        settings: BaseSettings | Mapping[str, str],
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = True,
    ) -> ServiceProcess:
        proc = ServiceProcess(
            name, service, settings, self.log_dir / f"{name}.log", extra_env, cwd, new_session
        )
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        for proc in self.procs.values():
            proc.check_alive()

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to all at once, then wait; SIGKILL to any still running after
        ``timeout_s``."""
        procs = list(self.procs.values())
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in reversed(procs):
            proc.stop(max(0.1, deadline - time.monotonic()))


@contextmanager
def running(log_dir: Path) -> Iterator[Processes]:
    """A :class:`Processes` group whose processes are stopped when the block ends."""
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


__all__ = [
    "BASIC_ENV",
    "HOST",
    "Processes",
    "ServiceExited",
    "ServiceProcess",
    "build_settings",
    "child_env",
    "free_port",
    "running",
    "service_command",
    "settings_env",
    "settings_from_env",
]
