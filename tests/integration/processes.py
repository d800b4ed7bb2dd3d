"""Real service processes for integration tests, started by :mod:`fedinspect.launcher`
(the demo's and the benchmarks' way): settings passed explicitly, nothing of the test
process's ``FEDINSPECT_*`` variables inherited, output kept in a log file that failing
tests show, always stopped."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedinspect.launcher import HOST, Service, ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


def split_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the ``FEDINSPECT_*`` settings, every other variable) of ``env``."""
    settings = {k: v for k, v in env.items() if k.startswith("FEDINSPECT_")}
    return settings, {k: v for k, v in env.items() if k not in settings}


class Process(ServiceProcess):
    """A service process with its output in ``log_dir/<name>.log``; ``env`` holds its
    settings (``FEDINSPECT_*``) and any other variables it needs (credentials)."""

    def __init__(
        self,
        name: str,
        service: Service,
        env: Mapping[str, str],
        log_dir: Path,
        threads: int = 2,
    ) -> None:
        settings, extra = split_env(env)
        extra = {"OMP_NUM_THREADS": str(threads), **extra}
        super().__init__(name, service, settings, log_dir / f"{name}.log", extra, cwd=ROOT)


def wait_healthy(url: str, proc: ServiceProcess, timeout: float = 60.0) -> None:
    assert url == proc.url, f"{proc.name} listens on {proc.url}, not {url}"
    proc.wait_healthy(timeout)


__all__ = ["HOST", "ROOT", "Process", "free_port", "split_env", "wait_healthy"]
