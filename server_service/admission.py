"""Admission control: a bound on the requests (and feature uploads) handled at once.

Past the bound a request waits up to ``admission_wait_s`` for a slot, then gets
``503 Service Unavailable`` with ``Retry-After`` instead of queueing without end. That
keeps a burst of edges from exhausting the worker threads and database connections
(every request would then time out), and bounds the memory that upload bodies take:
at most ``max_concurrent_uploads`` bodies are buffered at a time. ``/health`` is never
refused, so probes keep working under load. Edges retry 503 after ``Retry-After``.
One edge holds at most ``max_concurrent_uploads_per_edge`` upload slots, so a slow or
hostile edge cannot take them all. The middleware itself lives in ``fl_core.guards``.
"""

from __future__ import annotations

from fl_core.guards import AdmissionControl
from fl_core.schemas import ErrorResponse

#: paths admitted without a slot (liveness probes)
EXEMPT = frozenset({"/health"})

BUSY_RESPONSES: dict[int | str, dict[str, object]] = {
    503: {
        "model": ErrorResponse,
        "description": "the server is at its limit of concurrent requests or uploads; "
        "retry after the number of seconds in Retry-After",
        "headers": {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer"},
            }
        },
    }
}


__all__ = ["BUSY_RESPONSES", "EXEMPT", "AdmissionControl"]
