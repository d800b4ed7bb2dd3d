"""The deadline watcher: a lifespan task that re-evaluates collecting cycles.

It runs :func:`~server_service.services.cycles.check_cycles` in a worker thread every
``deadline_check_interval_s``; an error in one pass is logged and the next pass runs.
"""

from __future__ import annotations

import asyncio
import logging

from server_service.logs import log_event
from server_service.runtime import Runtime
from server_service.services.cycles import check_cycles


async def watch_deadlines(rt: Runtime) -> None:
    interval = rt.settings.deadline_check_interval_s
    while True:
        try:
            await asyncio.to_thread(check_cycles, rt)
        except Exception:
            log_event("watcher.error", logging.ERROR, exc_info=True)
        await asyncio.sleep(interval)


__all__ = ["watch_deadlines"]
