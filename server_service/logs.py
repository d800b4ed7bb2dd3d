"""Structured logs: one line per event, ``event=... cycle_id=... edge_id=...``.

Values are rendered with ``repr`` when they contain spaces or quotes, so a line stays
machine-parsable. Tokens are never passed here.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("server_service")


def _render(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return repr(text)
    return text


def log_event(
    event: str, level: int = logging.INFO, exc_info: bool = False, **fields: object
) -> None:
    """Log one event as ``event=<name> key=value ...`` (None values are left out)."""
    parts = [f"event={event}"] + [
        f"{key}={_render(value)}" for key, value in fields.items() if value is not None
    ]
    logger.log(level, " ".join(parts), exc_info=exc_info)


def configure_logging(level: str) -> None:
    """Plain one-line records on stderr (for ``run()``; tests keep pytest's handlers)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=False
    )
    logger.setLevel(level)
    # alembic says each step at INFO; the server logs one database.migrated event
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logger.getEffectiveLevel()))


__all__ = ["configure_logging", "log_event", "logger"]
