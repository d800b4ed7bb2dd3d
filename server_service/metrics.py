"""Prometheus metrics of one app instance, in its own CollectorRegistry.

A registry per app (not the process-global default) lets tests build many apps in
one process without "duplicated timeseries" errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fl_core.guards import method_label
from fl_core.schemas import CycleState


class ServerMetrics:
    """Requests by route and status, upload bytes, cycles by state, training time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedinspect_server_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "fedinspect_server_upload_bytes",
            "Bytes of feature uploads stored",
            registry=self.registry,
        )
        self.uploads = Counter(
            "fedinspect_server_uploads",
            "Feature uploads by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.cycles = Gauge(
            "fedinspect_server_cycles",
            "Cycles by state",
            ["state"],
            registry=self.registry,
        )
        self.training_seconds = Histogram(
            "fedinspect_server_training_seconds",
            "Wall time of server-side training per cycle",
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.trainings_started = Counter(
            "fedinspect_server_trainings_started",
            "Trainings this replica started (a cycle taken over counts again here)",
            registry=self.registry,
        )

    def render(self, cycles_by_state: Mapping[str, int]) -> bytes:
        for state in CycleState:
            self.cycles.labels(state=state.value).set(cycles_by_state.get(state.value, 0))
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every HTTP request by its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, get_metrics: Callable[[], ServerMetrics | None]) -> None:
        self.app = app
        self.get_metrics = get_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics = self.get_metrics()
            if metrics is not None:
                route: Any = scope.get("route")
                # Raw paths of unknown URLs would grow the label set without bound.
                template = getattr(route, "path", None) or "<unmatched>"
                # Likewise any method name a client makes up: one label for them all.
                method = method_label(str(scope.get("method", "")))
                metrics.requests.labels(route=template, method=method, status=str(status)).inc()


__all__ = ["RequestMetricsMiddleware", "ServerMetrics"]
