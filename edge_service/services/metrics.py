"""Prometheus metrics of one edge app, in its own registry (so several apps in one
process, as in tests, do not collide).

Jobs by state are read from the database at scrape time, so the numbers are right
after a restart too; the rest are counters and a histogram updated as things happen.
Requests are counted by :class:`fedinspect.guards.RequestMetrics`, as on the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedinspect.service import RequestCounter


class _JobsCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "fedinspect_edge_jobs", "Jobs recorded on this edge, by state", labels=["state"]
        )
        for state, n in sorted(self._counts().items()):
            family.add_metric([state], n)
        yield family


class EdgeMetrics:
    """The edge's metrics, registered in a fresh :class:`CollectorRegistry`."""

    def __init__(self, job_counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_JobsCollector(job_counts))
        self.predictions = Counter(
            "fedinspect_edge_predictions",
            "Images classified by POST /v1/predict",
            registry=self.registry,
        )
        self.prediction_latency = Histogram(
            "fedinspect_edge_prediction_latency_seconds",
            "Time to answer one POST /v1/predict request",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.bytes_uploaded = Counter(
            "fedinspect_edge_uploaded_bytes",
            "Feature bytes sent to the server",
            registry=self.registry,
        )
        #: counts each HTTP request (route template, method, status)
        self.count_request = RequestCounter("fedinspect_edge", self.registry)
        self.bytes_downloaded = Counter(
            "fedinspect_edge_downloaded_bytes",
            "Model weight bytes received from the server",
            registry=self.registry,
        )

    def on_transfer(self, direction: str, n: int) -> None:
        (self.bytes_uploaded if direction == "upload" else self.bytes_downloaded).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["EdgeMetrics"]
