"""Feature uploads: validate, store durably, record, then check the quorum.

An upload is acknowledged only after its blob is fsynced and its row committed, so a
kill -9 at any moment loses nothing the edge was told is stored.
"""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy import select

from fl_core.errors import Conflict
from fl_core.privacy import validate_upload
from fl_core.schemas import CycleState, FeatureSpec, UploadAck
from server_service.db import CycleRow, Session, UploadRow, utcnow
from server_service.logs import log_event
from server_service.runtime import Runtime
from server_service.services import cycle_state
from server_service.services.cycles import add_member, evaluate_cycle, get_row


def _not_collecting(cycle_id: int, state: str) -> Conflict:
    return Conflict(
        f"cycle {cycle_id} is {state}; uploads are accepted only while it is collecting"
    )


def _upload_of(session: Session, cycle_id: int, edge_id: str) -> UploadRow | None:
    return session.scalar(
        select(UploadRow).where(UploadRow.cycle_id == cycle_id, UploadRow.edge_id == edge_id)
    )


def check_upload_allowed(rt: Runtime, cycle_id: int, edge_id: str) -> None:
    """Refuse early (before the body is read) what no body could make succeed."""
    with rt.sessions() as session:
        row = get_row(session, cycle_id)
        # An edge re-sending its stored upload gets a 200 no-op even after collection.
        if (
            row.state != CycleState.collecting.value
            and _upload_of(session, cycle_id, edge_id) is None
        ):
            raise _not_collecting(cycle_id, row.state)


def _ack(row: UploadRow, unchanged: bool, replaced: bool) -> UploadAck:
    return UploadAck(
        cycle_id=row.cycle_id,
        edge_id=row.edge_id,
        rows=row.rows,
        sha256=row.sha256,
        unchanged=unchanged,
        replaced=replaced,
    )


def store_upload(rt: Runtime, cycle_id: int, edge_id: str, body: bytes) -> tuple[UploadAck, bool]:
    """Validate and store an edge's upload; returns the ack and whether it is new."""
    sha = hashlib.sha256(body).hexdigest()
    with rt.sessions() as session:
        cycle = get_row(session, cycle_id)
        existing = _upload_of(session, cycle_id, edge_id)
        if existing is not None and existing.sha256 == sha:
            rt.metrics.uploads.labels(outcome="unchanged").inc()
            return _ack(existing, unchanged=True, replaced=False), False
        if cycle.state != CycleState.collecting.value:
            raise _not_collecting(cycle_id, cycle.state)
        spec = FeatureSpec.model_validate_json(cycle.spec_json)

    try:
        # rows or per-class statistics, as the spec's privacy mode says
        rows = validate_upload(body, spec, rt.settings.max_upload_rows)
    except Exception:
        rt.metrics.uploads.labels(outcome="invalid").inc()
        raise
    rt.blobs.put(body)

    with rt.sessions() as session:
        # Touch the cycle first, conditionally: this takes the row (SQLite: database)
        # write lock, so a concurrent claim for training waits for this commit and the
        # training then sees this upload; if the claim won, the upload is refused.
        if not cycle_state.touch(session, cycle_id, CycleState.collecting):
            session.rollback()
            state = session.scalar(select(CycleRow.state).where(CycleRow.id == cycle_id))
            raise _not_collecting(cycle_id, str(state))
        existing = _upload_of(session, cycle_id, edge_id)
        replaced = existing is not None
        if existing is not None and existing.sha256 == sha:
            session.rollback()
            return _ack(existing, unchanged=True, replaced=False), False
        now = utcnow()
        if existing is None:
            row = UploadRow(
                cycle_id=cycle_id,
                edge_id=edge_id,
                sha256=sha,
                size=len(body),
                rows=rows,
                received_at=now,
            )
            session.add(row)
        else:
            row = existing
            row.sha256, row.size, row.rows, row.received_at = sha, len(body), rows, now
        add_member(session, cycle_id, edge_id)
        session.commit()

    rt.metrics.upload_bytes.inc(len(body))
    rt.metrics.uploads.labels(outcome="replaced" if replaced else "stored").inc()
    log_event(
        "upload.stored",
        cycle_id=cycle_id,
        edge_id=edge_id,
        rows=rows,
        size=len(body),
        sha256=sha,
        replaced=replaced,
    )
    try:
        evaluate_cycle(rt, cycle_id)
    except Exception:
        # The upload is stored and acknowledged; the deadline watcher retries this.
        log_event("cycle.evaluate_error", logging.ERROR, exc_info=True, cycle_id=cycle_id)
    return _ack(row, unchanged=False, replaced=replaced), not replaced


__all__ = ["check_upload_allowed", "store_upload"]
