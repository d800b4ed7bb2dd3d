"""Federated fine-tuning rounds on the server: the plan, the edges' updates, aggregation.

A cycle whose plan has ``rounds`` R > 0 moves ``training -> rounds`` once its head is
registered (round 1 trains from the head's model). Each edge whose features the head was
trained on sends one update per round (``PUT /v1/cycles/{id}/rounds/{r}/update``):
checked (:func:`fl_core.rounds.unpack_update`), fsynced, recorded, acknowledged. When
every such edge has sent its update, or at the round's deadline with the quorum
(``min_edges``), :func:`aggregate_round` averages them into the round's model version;
the last round's model is the cycle's result (``rounds -> done``). A deadline without
the quorum ends the cycle ``done`` with the last round's model and the reason.

Aggregation is one conditional update (``WHERE state = 'rounds' AND round = r``) in the
transaction that registers the model: of two threads or replicas aggregating a round at
once one registers it, and a server killed mid-round finds its updates in the database
and its blobs in the store: the deadline watcher aggregates once it is back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

import torch
from sqlalchemy import select
from sqlalchemy.exc import OperationalError as DBOperationalError

from fl_core.errors import Conflict, Forbidden, IntegrityError, NotFound
from fl_core.model import model_to_bytes
from fl_core.rounds import (
    Update,
    aggregate,
    apply_update,
    pack_aggregate,
    unpack_update,
    update_names,
)
from fl_core.schemas import (
    AggregatedUpdate,
    CycleState,
    FeatureSpec,
    RoundUpdateAck,
    TrainedFrom,
)
from server_service.db import CycleRow, RoundUpdateRow, Session, UploadRow, utcnow
from server_service.logs import log_event
from server_service.runtime import Runtime
from server_service.services import cycle_state
from server_service.services.cycles import (
    decide,
    get_row,
    round_versions,
    row_plan,
    updates_of,
)
from server_service.services.models import get_model, load_model, model_row, register_version


def _participants(session: Session, cycle_id: int) -> list[str]:
    """The edges a cycle's head was trained on: those that take part in its rounds."""
    return list(
        session.scalars(select(UploadRow.edge_id).where(UploadRow.cycle_id == cycle_id)).all()
    )


def _expected_shapes(rt: Runtime, version: int, train_from: str) -> dict[str, list[int]]:
    """Name -> shape of the tensors a round on model ``version`` trains (cached)."""
    key = (version, train_from)
    with rt.lock:
        cached = rt.round_shapes.get(key)
    if cached is not None:
        return cached
    with rt.sessions() as session:
        model = load_model(rt, get_model(session, version))
    params = dict(model.named_parameters())
    shapes = {n: list(params[n].shape) for n in update_names(model, train_from)}
    with rt.lock:
        rt.round_shapes[key] = shapes
    return shapes


def _not_open(cycle_id: int, row: CycleRow, round_number: int) -> Conflict:
    if row.state != CycleState.rounds.value:
        return Conflict(
            f"cycle {cycle_id} is {row.state}; updates are accepted only while its rounds run"
        )
    return Conflict(
        f"cycle {cycle_id} is at round {row.round}; round {round_number} takes no updates"
    )


def _not_participant(cycle_id: int, edge_id: str) -> Forbidden:
    return Forbidden(
        f"edge {edge_id} uploaded no features to cycle {cycle_id}: only the edges "
        "its head was trained on take part in its rounds"
    )


def _update_of(
    session: Session, cycle_id: int, round_number: int, edge_id: str
) -> RoundUpdateRow | None:
    return session.scalar(
        select(RoundUpdateRow).where(
            RoundUpdateRow.cycle_id == cycle_id,
            RoundUpdateRow.round == round_number,
            RoundUpdateRow.edge_id == edge_id,
        )
    )


def _ack(row: RoundUpdateRow, unchanged: bool, replaced: bool) -> RoundUpdateAck:
    return RoundUpdateAck(
        cycle_id=row.cycle_id,
        round=row.round,
        edge_id=row.edge_id,
        samples=row.samples,
        norm=row.norm,
        sha256=row.sha256,
        unchanged=unchanged,
        replaced=replaced,
    )


def check_update_allowed(rt: Runtime, cycle_id: int, round_number: int, edge_id: str) -> None:
    """Refuse early (before the body is read) what no body could make succeed."""
    with rt.sessions() as session:
        row = get_row(session, cycle_id)
        if _update_of(session, cycle_id, round_number, edge_id) is not None:
            return  # re-sending the stored update is a 200 no-op, even after the round
        if row.state != CycleState.rounds.value or row.round != round_number:
            raise _not_open(cycle_id, row, round_number)
        if edge_id not in _participants(session, cycle_id):
            raise _not_participant(cycle_id, edge_id)


def store_update(
    rt: Runtime, cycle_id: int, round_number: int, edge_id: str, body: bytes
) -> tuple[RoundUpdateAck, bool]:
    """Check and store an edge's update of a round; the ack and whether it is new."""
    sha = hashlib.sha256(body).hexdigest()
    with rt.sessions() as session:
        row = get_row(session, cycle_id)
        existing = _update_of(session, cycle_id, round_number, edge_id)
        if existing is not None and existing.sha256 == sha:
            rt.metrics.uploads.labels(outcome="unchanged").inc()
            return _ack(existing, unchanged=True, replaced=False), False
        if row.state != CycleState.rounds.value or row.round != round_number:
            raise _not_open(cycle_id, row, round_number)
        if edge_id not in _participants(session, cycle_id):
            raise _not_participant(cycle_id, edge_id)
        plan = row_plan(row)
        assert plan is not None and row.round_model_version is not None  # state rounds
        base_version = row.round_model_version
        spec_hash = row.spec_hash

    try:
        update = unpack_update(
            body,
            expected=_expected_shapes(rt, base_version, plan.train_from),
            plan=plan,
            spec_hash=spec_hash,
            round_number=round_number,
            base_version=base_version,
            max_samples=rt.settings.max_upload_rows,
        )
    except Exception:
        rt.metrics.uploads.labels(outcome="invalid").inc()
        raise
    rt.blobs.put(body)

    with rt.sessions() as session:
        # Takes the cycle's row lock first: an aggregation of this round that commits
        # before this one makes it refused; one that starts after it sees this update.
        if not cycle_state.touch(session, cycle_id, CycleState.rounds, at_round=round_number):
            session.rollback()
            raise _not_open(cycle_id, get_row(session, cycle_id), round_number)
        existing = _update_of(session, cycle_id, round_number, edge_id)
        replaced = existing is not None
        if existing is not None and existing.sha256 == sha:
            session.rollback()
            return _ack(existing, unchanged=True, replaced=False), False
        now = utcnow()
        if existing is None:
            stored = RoundUpdateRow(
                cycle_id=cycle_id,
                round=round_number,
                edge_id=edge_id,
                sha256=sha,
                size=len(body),
                samples=update.samples,
                norm=update.norm,
                received_at=now,
            )
            session.add(stored)
        else:
            stored = existing
            stored.sha256, stored.size, stored.received_at = sha, len(body), now
            stored.samples, stored.norm = update.samples, update.norm
        session.commit()

    rt.metrics.upload_bytes.inc(len(body))
    rt.metrics.uploads.labels(outcome="replaced" if replaced else "stored").inc()
    log_event(
        "round.update_stored",
        cycle_id=cycle_id,
        round=round_number,
        edge_id=edge_id,
        samples=update.samples,
        norm=round(update.norm, 4),
        size=len(body),
        replaced=replaced,
    )
    try:
        evaluate_round(rt, cycle_id)
    except Exception:
        # The update is stored and acknowledged; the deadline watcher retries this.
        log_event("round.evaluate_error", logging.ERROR, exc_info=True, cycle_id=cycle_id)
    return _ack(stored, unchanged=False, replaced=replaced), not replaced


def _quorum(min_edges: int, participants: Sequence[str]) -> int:
    """The updates a round needs: at most the edges the head was trained on (an operator
    may have trained it with fewer than ``min_edges``)."""
    return min(min_edges, len(participants))


def evaluate_round(rt: Runtime, cycle_id: int, now: datetime | None = None) -> str:
    """Apply the quorum rule to a cycle's running round: aggregate it, end the cycle
    at a deadline without the quorum, or wait. Returns the decision."""
    now = now or utcnow()
    with rt.sessions() as session:
        row = session.get(CycleRow, cycle_id)
        if row is None or row.state != CycleState.rounds.value:
            return "wait"
        assert row.round_deadline is not None and row.round_model_version is not None
        updated = [u.edge_id for u in updates_of(session, cycle_id, row.round)]
        participants = _participants(session, cycle_id)
        quorum = _quorum(row.min_edges, participants)
        decision = decide(updated, participants, quorum, row.round_deadline, now)
        round_number, last_version = row.round, row.round_model_version
        if decision == "fail":
            _end_early(
                session,
                cycle_id,
                round_number,
                last_version,
                f"round {round_number}: its deadline passed with {len(updated)} update(s), "
                f"{quorum} needed; the cycle ends with model {last_version}",
            )
            return decision
    if decision == "train":
        aggregate_round(rt, cycle_id, round_number)
    return decision


def _end_early(
    session: Session, cycle_id: int, round_number: int, last_version: int, reason: str
) -> None:
    """End a cycle's rounds ``done`` with the last round's model and the reason."""
    if cycle_state.move(
        session,
        cycle_id,
        CycleState.done,
        [CycleState.rounds],
        at_round=round_number,
        result_model_version=last_version,
        reason=reason,
    ):
        session.commit()
        log_event("cycle.done", cycle_id=cycle_id, model_version=last_version, reason=reason)


def _load_updates(
    rt: Runtime, rows: Sequence[RoundUpdateRow], **check: object
) -> tuple[list[Update], list[RoundUpdateRow]]:
    """The checked updates of ``rows``, and the rows they came from: an update whose blob
    is gone from the store (or no longer hashes to its sha256) is left out, loudly, since
    its edge, told it was stored, will not send it again. A store that cannot be reached
    raises: the watcher retries the round on its next pass."""
    updates, kept = [], []
    for r in rows:
        try:
            data = rt.blobs.get(r.sha256)
        except (NotFound, IntegrityError) as exc:
            log_event(
                "round.update_lost",
                logging.ERROR,
                cycle_id=r.cycle_id,
                round=r.round,
                edge_id=r.edge_id,
                sha256=r.sha256,
                error=str(exc),
            )
            continue
        updates.append(unpack_update(data, **check))  # type: ignore[arg-type]
        kept.append(r)
    return updates, kept


def aggregate_round(rt: Runtime, cycle_id: int, round_number: int) -> int | None:
    """Average round ``round_number``'s updates into the next model version and move the
    cycle on; the version, or None when the round had moved on meanwhile."""
    with rt.lock:
        if (cycle_id, round_number) in rt.aggregating:
            return None  # this process is at it already
        rt.aggregating.add((cycle_id, round_number))
    try:
        return _aggregate(rt, cycle_id, round_number)
    finally:
        with rt.lock:
            rt.aggregating.discard((cycle_id, round_number))


def _aggregate(rt: Runtime, cycle_id: int, round_number: int) -> int | None:
    with rt.sessions() as session:
        row = get_row(session, cycle_id)
        if row.state != CycleState.rounds.value or row.round != round_number:
            return None
        plan = row_plan(row)
        assert plan is not None and row.round_model_version is not None
        spec = FeatureSpec.model_validate_json(row.spec_json)
        rows = updates_of(session, cycle_id, round_number)
        base = get_model(session, row.round_model_version)
        versions = round_versions(row)
        # at least one update to average
        quorum = max(1, _quorum(row.min_edges, _participants(session, cycle_id)))
    model = load_model(rt, base)
    updates, rows = _load_updates(
        rt,
        rows,
        expected=_expected_shapes(rt, base.version, plan.train_from),
        plan=plan,
        spec_hash=row.spec_hash,
        round_number=round_number,
        base_version=base.version,
        max_samples=rt.settings.max_upload_rows,
    )
    if len(updates) < quorum:
        with rt.sessions() as session:
            _end_early(
                session,
                cycle_id,
                round_number,
                base.version,
                f"round {round_number}: {len(updates)} of its stored updates could be read "
                f"back from the blob store ({quorum} needed; the others' blobs are missing or "
                f"corrupt); the cycle ends with model {base.version}",
            )
        return None
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    mean = aggregate(updates, plan, generator)
    # rounded to the wire dtype before it is added: edges holding the parent rebuild this
    # model from the (smaller) update file, to the bit
    wire, update_file = pack_aggregate(mean, plan.dtype, base.sha256, generator)
    apply_update(model, wire)
    weights = model_to_bytes(model)
    sha = rt.blobs.put(weights)
    update = AggregatedUpdate(
        parent=base.version,
        parent_sha256=base.sha256,
        sha256=rt.blobs.put(update_file),
        size=len(update_file),
        dtype=plan.dtype,
    )
    samples = {r.edge_id: r.samples for r in rows}
    trained_from = TrainedFrom(
        cycle_id=cycle_id,
        edges=sorted(samples),
        round=round_number,
        samples_per_edge=samples,
        update=update,
    )
    last = round_number >= plan.rounds
    target = CycleState.done if last else CycleState.rounds

    def claim(session: Session, version: int) -> bool:
        values: dict[str, object] = {"round_versions_json": json.dumps([*versions, version])}
        if last:
            values["result_model_version"] = version
        else:
            values["round"] = round_number + 1
            values["round_model_version"] = version
            values["round_deadline"] = utcnow() + timedelta(seconds=plan.deadline_s)
        return cycle_state.move(
            session, cycle_id, target, [CycleState.rounds], at_round=round_number, **values
        )

    version = register_version(
        rt,
        claim,
        lambda v: model_row(
            v, base.version, model, sha, len(weights), None, trained_from, spec.privacy
        ),
    )
    if version is None:
        return None
    log_event(
        "round.aggregated",
        cycle_id=cycle_id,
        round=round_number,
        edges=len(rows),
        model_version=version,
        sha256=sha,
    )
    if last:
        log_event("cycle.done", cycle_id=cycle_id, model_version=version, rounds=round_number)
    return version


def check_rounds(rt: Runtime) -> None:
    """One pass of the deadline watcher over the cycles whose rounds run: aggregate a
    round whose updates are all in (a server restarted after storing the last one), or
    apply its deadline."""
    with rt.sessions() as session:
        ids = session.scalars(
            select(CycleRow.id).where(CycleRow.state == CycleState.rounds.value)
        ).all()
    for cycle_id in ids:
        try:
            evaluate_round(rt, cycle_id)
        except DBOperationalError:
            raise  # the database is down: the watcher says so once and retries
        except Exception:
            # One round that cannot be aggregated (its blob store unreachable, say) must
            # not hold up the other cycles' rounds, nor the takeover of trainings that
            # follows in the same pass; it is retried on the next one.
            log_event("round.evaluate_error", logging.ERROR, exc_info=True, cycle_id=cycle_id)


__all__ = [
    "aggregate_round",
    "check_rounds",
    "check_update_allowed",
    "evaluate_round",
    "store_update",
]
