"""Leases in the database: which replica trains a cycle, which one runs the watcher.

A lease is a row ``(name, owner, expires_at)``. :func:`acquire` takes it when it is
free or expired, or renews it when the caller already holds it; of replicas racing
for one lease exactly one wins (a conditional UPDATE, or the INSERT that the primary
key lets through once). The holder renews its leases on a heartbeat; a replica that
dies stops renewing, and another takes the lease over once it has expired. Clocks of
replicas are assumed to agree to well within a lease's time to live.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import CursorResult, delete, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import sessionmaker

from server_service.db import LeaseRow, Session, utcnow

WATCHER = "watcher"


def cycle_lease(cycle_id: int) -> str:
    """The name of the lease held by the replica that trains ``cycle_id``."""
    return f"cycle:{cycle_id}"


def acquire(sessions: sessionmaker[Session], name: str, owner: str, ttl_s: float) -> bool:
    """Take or renew the lease ``name`` for ``ttl_s`` seconds; True if ``owner`` holds it."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    with sessions() as session:
        result = session.execute(
            update(LeaseRow)
            .where(
                LeaseRow.name == name,
                (LeaseRow.owner == owner) | (LeaseRow.expires_at < now),
            )
            .values(owner=owner, expires_at=expires)
        )
        assert isinstance(result, CursorResult)
        if result.rowcount == 1:
            session.commit()
            return True
        session.add(LeaseRow(name=name, owner=owner, expires_at=expires))
        try:
            session.commit()
        except DBIntegrityError:
            session.rollback()  # held by a live replica
            return False
        return True


def renew(
    sessions: sessionmaker[Session], names: Iterable[str], owner: str, ttl_s: float
) -> set[str]:
    """Extend the leases ``names`` that ``owner`` still holds; returns the ones it lost."""
    wanted = set(names)
    if not wanted:
        return set()
    expires = utcnow() + timedelta(seconds=ttl_s)
    kept: set[str] = set()
    with sessions() as session:
        for name in sorted(wanted):
            result = session.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, LeaseRow.owner == owner)
                .values(expires_at=expires)
            )
            assert isinstance(result, CursorResult)
            if result.rowcount == 1:
                kept.add(name)
        session.commit()
    return wanted - kept


def release(sessions: sessionmaker[Session], name: str, owner: str) -> None:
    """Give the lease up at once (only when ``owner`` holds it)."""
    with sessions() as session:
        session.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.owner == owner))
        session.commit()


__all__ = ["WATCHER", "acquire", "cycle_lease", "release", "renew"]
