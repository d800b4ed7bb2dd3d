"""Training cycles: open or join, inspect, quorum and deadline decisions, cancel.

The quorum rule lives in :func:`decide` (pure); :func:`evaluate_cycle` applies it to
one collecting cycle and is called after every upload and by the deadline watcher.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from fl_core.errors import Conflict, NotFound, Unavailable
from fl_core.schemas import (
    Cycle,
    CycleState,
    EvalMetrics,
    FeatureSpec,
    RoundPlan,
    RoundUpdateInfo,
    UploadInfo,
)
from server_service import leases
from server_service.db import (
    CycleMemberRow,
    CycleRow,
    RoundUpdateRow,
    Session,
    UploadRow,
    utcnow,
)
from server_service.logs import log_event
from server_service.runtime import Runtime
from server_service.services import cycle_state
from server_service.services.auth import Caller
from server_service.services.models import latest_model, plan_for, spec_for
from server_service.services.training import record_failures, submit_training

Decision = Literal["wait", "train", "fail"]


def decide(
    uploaded: Collection[str],
    joined: Collection[str],
    min_edges: int,
    deadline: datetime,
    now: datetime,
) -> Decision:
    """What a collecting cycle should do now.

    Train once the quorum has uploaded and no edge that joined is still missing; at
    the deadline, train with the quorum or fail without it.
    """
    return decide_counts(len(uploaded), len(set(joined) - set(uploaded)), min_edges, deadline, now)


def decide_counts(
    uploaded: int, missing: int, min_edges: int, deadline: datetime, now: datetime
) -> Decision:
    """:func:`decide` from counts: ``uploaded`` edges, ``missing`` joined ones that have
    not (what the database counts without sending every edge id)."""
    quorum = uploaded >= min_edges
    if quorum and missing == 0:
        return "train"
    if now >= deadline:
        return "train" if quorum else "fail"
    return "wait"


def row_plan(row: CycleRow) -> RoundPlan | None:
    return RoundPlan.model_validate_json(row.plan_json) if row.plan_json else None


def round_versions(row: CycleRow) -> list[int]:
    return [int(v) for v in json.loads(row.round_versions_json)] if row.round_versions_json else []


def updates_of(session: Session, cycle_id: int, round_number: int) -> list[RoundUpdateRow]:
    return list(
        session.scalars(
            select(RoundUpdateRow)
            .where(RoundUpdateRow.cycle_id == cycle_id, RoundUpdateRow.round == round_number)
            .order_by(RoundUpdateRow.edge_id)
        ).all()
    )


def update_infos(session: Session, row: CycleRow) -> list[RoundUpdateInfo]:
    if row.state != CycleState.rounds.value:
        return []
    return [
        RoundUpdateInfo(
            edge_id=u.edge_id,
            round=u.round,
            samples=u.samples,
            norm=u.norm,
            sha256=u.sha256,
            size=u.size,
            received_at=u.received_at,
        )
        for u in updates_of(session, row.id, row.round)
    ]


def to_cycle(session: Session, row: CycleRow) -> Cycle:
    members = session.scalars(
        select(CycleMemberRow.edge_id)
        .where(CycleMemberRow.cycle_id == row.id)
        .order_by(CycleMemberRow.joined_at, CycleMemberRow.edge_id)
    ).all()
    uploads = session.scalars(
        select(UploadRow).where(UploadRow.cycle_id == row.id).order_by(UploadRow.received_at)
    ).all()
    return Cycle(
        id=row.id,
        state=CycleState(row.state),
        base_model_version=row.base_model_version,
        spec=FeatureSpec.model_validate_json(row.spec_json),
        spec_hash=row.spec_hash,
        min_edges=row.min_edges,
        deadline=row.deadline,
        created_at=row.created_at,
        updated_at=row.updated_at,
        joined_edges=list(members),
        uploads=[
            UploadInfo(
                edge_id=u.edge_id,
                rows=u.rows,
                sha256=u.sha256,
                size=u.size,
                received_at=u.received_at,
            )
            for u in uploads
        ],
        result_model_version=row.result_model_version,
        metrics=EvalMetrics.model_validate_json(row.metrics_json) if row.metrics_json else None,
        reason=row.reason,
        plan=row_plan(row),
        round=row.round,
        round_model_version=row.round_model_version,
        round_deadline=row.round_deadline,
        round_updates=update_infos(session, row),
        round_versions=round_versions(row),
    )


def get_row(session: Session, cycle_id: int) -> CycleRow:
    # populate_existing: a conditional UPDATE may have changed the row behind the session.
    row = session.get(CycleRow, cycle_id, populate_existing=True)
    if row is None:
        raise NotFound(f"cycle {cycle_id} not found")
    return row


def get_cycle(session: Session, cycle_id: int) -> Cycle:
    return to_cycle(session, get_row(session, cycle_id))


def list_cycles(session: Session, state: CycleState | None = None, limit: int = 100) -> list[Cycle]:
    query = select(CycleRow).order_by(CycleRow.id.desc()).limit(limit)
    if state is not None:
        query = query.where(CycleRow.state == state.value)
    return [to_cycle(session, r) for r in session.scalars(query).all()]


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(CycleRow.state, func.count()).group_by(CycleRow.state)).all()
    return {state: int(n) for state, n in rows}


def _collecting(session: Session) -> CycleRow | None:
    return session.scalar(select(CycleRow).where(CycleRow.state == CycleState.collecting.value))


def add_member(session: Session, cycle_id: int, edge_id: str) -> None:
    """Record that an edge takes part in a cycle (no-op when it already does)."""
    if session.get(CycleMemberRow, (cycle_id, edge_id)) is None:
        session.add(CycleMemberRow(cycle_id=cycle_id, edge_id=edge_id, joined_at=utcnow()))


def open_or_join(rt: Runtime, session: Session, caller: Caller) -> tuple[Cycle, bool]:
    """The collecting cycle (joined by an edge caller), opening one if none is; True if new."""
    created = False
    row = _collecting(session)
    if row is None:
        base = latest_model(session)
        if not rt.blobs.exists(base.sha256):
            log_event("cycle.base_missing", logging.ERROR, model_version=base.version)
            raise Unavailable(
                f"the weights of base model version {base.version} are missing from the "
                "server's blob store: no cycle opens until an operator restores them"
            )
        spec = spec_for(rt, base)
        plan = plan_for(rt, base)
        now = utcnow()
        row = CycleRow(
            state=CycleState.collecting.value,
            base_model_version=base.version,
            spec_json=spec.model_dump_json(),
            spec_hash=spec.spec_hash(),
            min_edges=rt.settings.min_edges,
            plan_json=plan.model_dump_json(),
            deadline=now + timedelta(seconds=rt.settings.cycle_deadline_s),
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        try:
            session.commit()
            created = True
            log_event(
                "cycle.opened",
                cycle_id=row.id,
                base_model_version=base.version,
                min_edges=row.min_edges,
                deadline=row.deadline.isoformat(),
            )
        except DBIntegrityError:
            # A concurrent request opened one first (unique index on collecting).
            session.rollback()
            row = _collecting(session)
            if row is None:
                raise Conflict("the collecting cycle changed concurrently; try again") from None
    if caller.edge_id is not None:
        add_member(session, row.id, caller.edge_id)
        try:
            session.commit()
        except DBIntegrityError:
            session.rollback()  # the same edge joined concurrently: nothing to add
        log_event("cycle.joined", cycle_id=row.id, edge_id=caller.edge_id)
    return to_cycle(session, row), created


def _fail_reason(n_uploads: int, min_edges: int) -> str:
    return f"deadline passed with {n_uploads} upload(s); {min_edges} needed"


def evaluate_cycle(rt: Runtime, cycle_id: int, now: datetime | None = None) -> Decision:
    """Apply :func:`decide` to a collecting cycle: claim it for training or fail it."""
    now = now or utcnow()
    with rt.sessions() as session:
        row = session.get(CycleRow, cycle_id)
        if row is None or row.state != CycleState.collecting.value:
            return "wait"
        # Counted in the database: run after every upload, reading each edge id of the
        # cycle twice cost milliseconds per upload at 200 edges, growing with the fleet.
        uploaders = select(UploadRow.edge_id).where(UploadRow.cycle_id == cycle_id)
        uploaded = session.scalar(select(func.count()).select_from(uploaders.subquery())) or 0
        not_uploaded = CycleMemberRow.edge_id.not_in(uploaders)
        missing = (
            session.scalar(
                select(func.count())
                .select_from(CycleMemberRow)
                .where(CycleMemberRow.cycle_id == cycle_id, not_uploaded)
            )
            or 0
        )
        decision = decide_counts(uploaded, missing, row.min_edges, row.deadline, now)
        if decision == "wait":
            return decision
        if decision == "fail":
            reason = _fail_reason(uploaded, row.min_edges)
            if cycle_state.move(
                session, cycle_id, CycleState.failed, [CycleState.collecting], reason=reason
            ):
                session.commit()
                log_event("cycle.failed", cycle_id=cycle_id, reason=reason)
            return decision
        trigger = "quorum" if missing == 0 else "deadline"
    _claim_and_submit(rt, cycle_id, trigger)
    return decision


def _claim_and_submit(rt: Runtime, cycle_id: int, trigger: str) -> bool:
    with rt.sessions() as session:
        claimed = cycle_state.move(session, cycle_id, CycleState.training, [CycleState.collecting])
        session.commit()
    if claimed:
        log_event("cycle.training_claimed", cycle_id=cycle_id, trigger=trigger)
        submit_training(rt, cycle_id)
    return claimed


def train_now(rt: Runtime, cycle_id: int) -> Cycle:
    """Close collection of a cycle now and train it (operator request)."""
    with rt.sessions() as session:
        row = get_row(session, cycle_id)
        if row.state != CycleState.collecting.value:
            raise Conflict(
                f"cycle {cycle_id} is {row.state}; only a collecting cycle can start training"
            )
        n = session.scalar(
            select(func.count()).select_from(UploadRow).where(UploadRow.cycle_id == cycle_id)
        )
        if not n:
            raise Conflict(f"cycle {cycle_id} has no uploads yet")
    if not _claim_and_submit(rt, cycle_id, "operator"):
        raise Conflict(f"cycle {cycle_id} changed state concurrently; try again")
    with rt.sessions() as session:
        return get_cycle(session, cycle_id)


def cancel(rt: Runtime, cycle_id: int) -> Cycle:
    """Cancel a collecting or training cycle; a running training's result is discarded."""
    with rt.sessions() as session:
        cycle_state.move_or_conflict(
            session, cycle_id, CycleState.cancelled, reason="cancelled by an operator"
        )
        session.commit()
        log_event("cycle.cancelled", cycle_id=cycle_id)
        return get_cycle(session, cycle_id)


def check_cycles(rt: Runtime) -> None:
    """One pass of the deadline watcher over every collecting cycle (and the failed
    trainings that could not be recorded yet)."""
    record_failures(rt)
    with rt.sessions() as session:
        ids = session.scalars(
            select(CycleRow.id).where(CycleRow.state == CycleState.collecting.value)
        ).all()
    for cycle_id in ids:
        evaluate_cycle(rt, cycle_id)


def take_over_training(rt: Runtime) -> list[int]:
    """Queue every cycle in ``training`` that no live replica holds the lease of.

    At start this resumes what a previous run of this replica left (its own leases
    are taken back at once); on the watcher it takes over the cycles of a replica
    that died (their leases expire). Cycles queued here already are skipped.
    """
    with rt.sessions() as session:
        ids = list(
            session.scalars(
                select(CycleRow.id).where(CycleRow.state == CycleState.training.value)
            ).all()
        )
    taken = []
    for cycle_id in ids:
        with rt.lock:
            if cycle_id in rt.training_ids:
                continue
        lease = leases.cycle_lease(cycle_id)
        if not leases.acquire(rt.sessions, lease, rt.replica_id, rt.settings.lease_ttl_s):
            continue  # a live replica trains it
        rt.hold(lease)  # renewed while it waits in the queue
        log_event("cycle.training_resumed", cycle_id=cycle_id, replica=rt.replica_id)
        if submit_training(rt, cycle_id):
            taken.append(cycle_id)
        elif rt.drop(lease):
            leases.release(rt.sessions, lease, rt.replica_id)
    return taken


def resume_training(rt: Runtime) -> list[int]:
    """Queue again the cycles found in ``training`` at start (see take_over_training)."""
    return take_over_training(rt)


__all__ = [
    "Decision",
    "add_member",
    "cancel",
    "check_cycles",
    "counts_by_state",
    "decide",
    "decide_counts",
    "evaluate_cycle",
    "get_cycle",
    "get_row",
    "list_cycles",
    "open_or_join",
    "resume_training",
    "round_versions",
    "row_plan",
    "take_over_training",
    "to_cycle",
    "train_now",
    "update_infos",
    "updates_of",
]
