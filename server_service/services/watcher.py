"""The deadline watcher: a lifespan task that re-evaluates collecting cycles and the
rounds of cycles in federated fine-tuning.

Every ``deadline_check_interval_s`` it renews the leases this replica holds (its
heartbeat, every third of ``lease_ttl_s``) and takes or renews the ``watcher`` lease.
The replica that holds it runs :func:`~server_service.services.cycles.check_cycles`
and :func:`~server_service.services.rounds.check_rounds` (deadlines fire once, on one
replica; a round whose updates all arrived before a crash is aggregated) and takes
over cycles whose training replica died. An error in one pass is logged and the next pass runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from sqlalchemy.exc import OperationalError

from server_service import leases
from server_service.logs import log_event
from server_service.runtime import Runtime
from server_service.services.cycles import check_cycles, take_over_training
from server_service.services.rounds import check_rounds


def heartbeat(rt: Runtime) -> None:
    """Renew this replica's leases and take (or keep) the watcher lease."""
    ttl = rt.settings.lease_ttl_s
    with rt.lock:
        held = set(rt.leases_held)
    lost = leases.renew(rt.sessions, held, rt.replica_id, ttl)
    if lost:
        rt.mark_lost(lost)
        log_event("lease.lost", logging.WARNING, leases=",".join(sorted(lost)))
    watching = leases.acquire(rt.sessions, leases.WATCHER, rt.replica_id, ttl)
    if watching != rt.watching:
        log_event("watcher.lease", replica=rt.replica_id, held=watching)
    rt.watching = watching


def watch_pass(rt: Runtime) -> None:
    if rt.watching:
        check_cycles(rt)
        check_rounds(rt)
        take_over_training(rt)


async def _in_thread(fn: Callable[[Runtime], None], rt: Runtime) -> None:
    """Run one pass in a worker thread; cancelled, wait for the pass to end first, so
    that no pass holds a database connection after the lifespan disposed the engine."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, rt))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


async def watch_deadlines(rt: Runtime) -> None:
    interval = rt.settings.deadline_check_interval_s
    beat_every = rt.settings.lease_ttl_s / 3
    last_beat = -float("inf")
    while True:
        try:
            if time.monotonic() - last_beat >= beat_every:
                await _in_thread(heartbeat, rt)
                last_beat = time.monotonic()
            await _in_thread(watch_pass, rt)
        except OperationalError as exc:
            # The database is down or restarting: one line, and the next pass retries.
            log_event("watcher.database_unavailable", logging.WARNING, error=type(exc).__name__)
            rt.watching = False
        except Exception:
            log_event("watcher.error", logging.ERROR, exc_info=True)
        await asyncio.sleep(interval)


__all__ = ["heartbeat", "watch_deadlines", "watch_pass"]
