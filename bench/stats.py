"""Repeat a measurement and summarise it as median / min / max; write a results folder."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """``{"median", "min", "max", "runs"}`` of repeated measurements."""
    if not values:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": len(values),
    }


def rate(work: Callable[[], int], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Items per second of ``work()`` (which returns how many items it did)."""
    for _ in range(warmup):
        work()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        n = work()
        rates.append(n / (time.perf_counter() - started))
    return summary(rates, 1)


def fmt(s: dict[str, Any] | None, unit: str = "") -> str:
    """``median (min-max)`` for Markdown tables."""
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median']:g}{unit} ({s['min']:g}-{s['max']:g})"


__all__ = ["fmt", "rate", "summary"]


def write_results(out: Path, results: dict[str, Any], page: str) -> None:
    """A bench section's folder: ``results.json`` (its data) and ``results.md`` (``page``,
    the Markdown its own renderer made of that data)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(page)
