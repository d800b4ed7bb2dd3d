"""The cycle state machine, in one place.

    collecting -> training -> done | failed
    training -> rounds -> done (federated fine-tuning rounds after the head)
    rounds -> rounds           (the next round)
    collecting -> failed       (deadline passed without the quorum)
    collecting | training | rounds -> cancelled
    training -> training       (re-claimed after a restart)

Services never write ``state`` without going through :func:`check_transition` or
:func:`sources_for` (the states an UPDATE ... WHERE state IN (...) may start from).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, select, update

from fl_core.errors import Conflict, NotFound
from fl_core.schemas import CycleState, RoundPlan
from server_service.db import CycleRow, Session, utcnow

S = CycleState

TRANSITIONS: Mapping[CycleState, frozenset[CycleState]] = {
    S.collecting: frozenset({S.training, S.failed, S.cancelled}),
    S.training: frozenset({S.training, S.rounds, S.done, S.failed, S.cancelled}),
    S.rounds: frozenset({S.rounds, S.done, S.failed, S.cancelled}),
    S.done: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}

TERMINAL: frozenset[CycleState] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


def can_transition(current: CycleState, target: CycleState) -> bool:
    return target in TRANSITIONS[current]


def check_transition(current: CycleState, target: CycleState, cycle_id: int) -> None:
    """Raise Conflict unless ``current -> target`` is allowed."""
    if not can_transition(current, target):
        raise Conflict(f"cycle {cycle_id} is {current.value}; it cannot become {target.value}")


def sources_for(target: CycleState) -> list[CycleState]:
    """States from which ``target`` may be reached (for conditional UPDATEs)."""
    return [s for s, nxt in TRANSITIONS.items() if target in nxt]


def move(
    session: Session,
    cycle_id: int,
    target: CycleState,
    from_states: Iterable[CycleState] | None = None,
    at_round: int | None = None,
    **values: Any,
) -> bool:
    """Move a cycle to ``target`` if it is in one of ``from_states`` (and, given
    ``at_round``, at that federated round); True if it moved.

    One conditional ``UPDATE ... WHERE state IN (...)``: of several threads or
    replicas racing for the same move, exactly one wins (a database-level claim).
    The caller commits.
    """
    sources = list(from_states) if from_states is not None else sources_for(target)
    for source in sources:
        check_transition(source, target, cycle_id)
    query = update(CycleRow).where(
        CycleRow.id == cycle_id, CycleRow.state.in_([s.value for s in sources])
    )
    if at_round is not None:
        query = query.where(CycleRow.round == at_round)
    result = session.execute(query.values(state=target.value, updated_at=utcnow(), **values))
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def touch(session: Session, cycle_id: int, state: CycleState, at_round: int | None = None) -> bool:
    """Bump ``updated_at`` if the cycle is in ``state`` (at round ``at_round``, given
    one); True if it is.

    Not a transition: it write-locks the cycle's row until the caller commits, so a
    concurrent :func:`move` away from ``state`` waits for that commit.
    """
    query = update(CycleRow).where(CycleRow.id == cycle_id, CycleRow.state == state.value)
    if at_round is not None:
        query = query.where(CycleRow.round == at_round)
    result = session.execute(query.values(updated_at=utcnow()))
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def move_or_conflict(session: Session, cycle_id: int, target: CycleState, **values: Any) -> None:
    """Like :func:`move` from any allowed state; NotFound / Conflict when it cannot."""
    if move(session, cycle_id, target, **values):
        return
    state = session.scalar(select(CycleRow.state).where(CycleRow.id == cycle_id))
    if state is None:
        raise NotFound(f"cycle {cycle_id} not found")
    check_transition(CycleState(state), target, cycle_id)
    raise Conflict(f"cycle {cycle_id} changed state concurrently; try again")


def after_head(
    row_plan_json: str | None, version: int, now: datetime
) -> tuple[CycleState, dict[str, Any]]:
    """Where a cycle goes once its head is registered as ``version``, and the values to
    write: ``rounds`` at round 1 when its plan has rounds, else ``done``."""
    plan = RoundPlan.model_validate_json(row_plan_json) if row_plan_json else None
    versions = json.dumps([version])
    if plan is None or plan.rounds == 0:
        return CycleState.done, {"result_model_version": version, "round_versions_json": versions}
    return CycleState.rounds, {
        "round": 1,
        "round_model_version": version,
        "round_deadline": now + timedelta(seconds=plan.deadline_s),
        "round_versions_json": versions,
    }


__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "after_head",
    "can_transition",
    "check_transition",
    "move",
    "move_or_conflict",
    "sources_for",
    "touch",
]
