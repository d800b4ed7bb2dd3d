"""The cycle state machine table and the quorum / deadline decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fl_core.errors import Conflict
from fl_core.schemas import CycleState
from server_service.services.cycle_state import (
    TERMINAL,
    TRANSITIONS,
    can_transition,
    check_transition,
    sources_for,
)
from server_service.services.cycles import decide, decide_counts

S = CycleState

ALLOWED = {
    (S.collecting, S.training),
    (S.collecting, S.failed),
    (S.collecting, S.cancelled),
    (S.training, S.training),
    (S.training, S.done),
    (S.training, S.failed),
    (S.training, S.cancelled),
    (S.training, S.rounds),
    (S.rounds, S.rounds),
    (S.rounds, S.done),
    (S.rounds, S.failed),
    (S.rounds, S.cancelled),
}


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_transition_table(current: CycleState, target: CycleState) -> None:
    allowed = (current, target) in ALLOWED
    assert can_transition(current, target) is allowed
    if allowed:
        check_transition(current, target, 7)
    else:
        with pytest.raises(Conflict) as err:
            check_transition(current, target, 7)
        assert err.value.detail == f"cycle 7 is {current.value}; it cannot become {target.value}"


def test_every_state_is_in_the_table_and_terminal_states_are_final() -> None:
    assert set(TRANSITIONS) == set(S)
    assert set(TERMINAL) == {S.done, S.failed, S.cancelled}
    assert sources_for(S.cancelled) == [S.collecting, S.training, S.rounds]
    assert sources_for(S.done) == [S.training, S.rounds]


NOW = datetime(2030, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(seconds=60)
EARLIER = NOW - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("uploaded", "joined", "min_edges", "deadline", "expected"),
    [
        ([], [], 1, LATER, "wait"),
        (["a"], ["a"], 1, LATER, "train"),
        (["a"], ["a", "b"], 1, LATER, "wait"),  # b joined and may still upload
        (["a", "b"], ["a", "b"], 2, LATER, "train"),
        (["a"], ["a"], 2, LATER, "wait"),  # below the quorum
        (["a"], ["a", "b"], 1, EARLIER, "train"),  # deadline: the quorum is enough
        (["a"], ["a"], 2, EARLIER, "fail"),
        ([], ["a"], 1, EARLIER, "fail"),
    ],
)
def test_decide(
    uploaded: list[str], joined: list[str], min_edges: int, deadline: datetime, expected: str
) -> None:
    assert decide(uploaded, joined, min_edges, deadline, NOW) == expected
    # what evaluate_cycle asks, from the counts the database gives
    missing = len(set(joined) - set(uploaded))
    assert decide_counts(len(uploaded), missing, min_edges, deadline, NOW) == expected
