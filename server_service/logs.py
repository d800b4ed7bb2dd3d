"""The server's structured log: :func:`log_event` on the ``server_service`` logger.

One line per event, ``event=... cycle_id=... edge_id=...``, rendered by
:func:`fedinspect.service.log_event` (the edge writes its lines the same way).
"""

from __future__ import annotations

import logging

from fedinspect import service

logger = logging.getLogger("server_service")


def log_event(
    event: str, level: int = logging.INFO, exc_info: bool = False, **fields: object
) -> None:
    """Log one event as ``event=<name> key=value ...`` (None values are left out)."""
    service.log_event(logger, event, level, exc_info, **fields)


__all__ = ["log_event", "logger"]
