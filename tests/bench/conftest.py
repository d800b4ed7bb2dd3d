"""Fixtures shared by the tests of ``bench``'s modules."""

from __future__ import annotations

from typing import Any

import pytest

from bench import demo_runs, extraction, flower, ingest, limit, wire
from bench import run as bench_run


@pytest.fixture
def no_heavy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any section that starts fails the test instead of running for minutes."""

    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a benchmark section ran")

    monkeypatch.setattr(extraction, "run", forbidden)
    monkeypatch.setattr(wire, "run", forbidden)
    monkeypatch.setattr(ingest, "run", forbidden)
    monkeypatch.setattr(limit, "run", forbidden)
    monkeypatch.setattr(demo_runs, "run_demos", forbidden)
    monkeypatch.setattr(flower, "run", forbidden)
    monkeypatch.setattr(bench_run, "_machine", lambda: {"load_average_at_start": [0.0, 0.0, 0.0]})
