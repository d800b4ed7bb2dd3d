"""Prometheus metrics of one app instance, in its own CollectorRegistry.

A registry per app (not the process-global default) lets tests build many apps in
one process without "duplicated timeseries" errors. Requests are counted by
:class:`fedinspect.guards.RequestMetrics`, as on the edge.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fedinspect.service import RequestCounter
from fl_core.schemas import CycleState


class ServerMetrics:
    """Requests by route and status, upload bytes, cycles by state, training time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: counts each HTTP request (route template, method, status)
        self.count_request = RequestCounter("fedinspect_server", self.registry)
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


__all__ = ["ServerMetrics"]
