"""The cycle state machine, in one place.

    collecting -> training -> done | failed
    collecting -> failed       (deadline passed without the quorum)
    collecting | training -> cancelled
    training -> training       (re-claimed after a restart)

Services never write ``state`` without going through :func:`check_transition` or
:func:`sources_for` (the states an UPDATE ... WHERE state IN (...) may start from).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import CursorResult, select, update

from fl_core.errors import Conflict, NotFound
from fl_core.schemas import CycleState
from server_service.db import CycleRow, Session, utcnow

S = CycleState

TRANSITIONS: Mapping[CycleState, frozenset[CycleState]] = {
    S.collecting: frozenset({S.training, S.failed, S.cancelled}),
    S.training: frozenset({S.training, S.done, S.failed, S.cancelled}),
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
    **values: Any,
) -> bool:
    """Move a cycle to ``target`` if it is in one of ``from_states``; True if it moved.

    One conditional ``UPDATE ... WHERE state IN (...)``: of several threads or
    replicas racing for the same move, exactly one wins (a database-level claim).
    The caller commits.
    """
    sources = list(from_states) if from_states is not None else sources_for(target)
    for source in sources:
        check_transition(source, target, cycle_id)
    result = session.execute(
        update(CycleRow)
        .where(CycleRow.id == cycle_id, CycleRow.state.in_([s.value for s in sources]))
        .values(state=target.value, updated_at=utcnow(), **values)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def touch(session: Session, cycle_id: int, state: CycleState) -> bool:
    """Bump ``updated_at`` if the cycle is in ``state``; True if it is.

    Not a transition: it write-locks the cycle's row until the caller commits, so a
    concurrent :func:`move` away from ``state`` waits for that commit.
    """
    result = session.execute(
        update(CycleRow)
        .where(CycleRow.id == cycle_id, CycleRow.state == state.value)
        .values(updated_at=utcnow())
    )
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


__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "can_transition",
    "check_transition",
    "move",
    "move_or_conflict",
    "sources_for",
    "touch",
]
