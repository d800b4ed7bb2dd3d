"""Server-side training of a cycle, off the event loop.

:func:`submit_training` queues a cycle that was claimed (``collecting -> training``)
on the runtime's single-worker executor. The worker first takes the cycle's lease in
the database: of several replicas that queued the same cycle, one trains it, and if
that one dies, another takes the cycle over once the lease has expired.
:func:`train_cycle` pools the uploads (in ``stats`` privacy mode: virtual rows
sampled, seeded, from each edge's per-class statistics), trains the part above the
cut and registers the next model version; whatever goes
wrong, the cycle ends ``failed`` with a reason and the server keeps running.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select
from sqlalchemy.exc import OperationalError as DBOperationalError

from fl_core.errors import FedInspectError, shorten
from fl_core.model import SplitModel, model_to_bytes
from fl_core.privacy import Upload, training_rows, unpack_upload, upload_rows
from fl_core.schemas import CycleState, EvalMetrics, FeatureSpec, TrainedFrom
from fl_core.training import TrainReport, train_upper
from server_service import leases
from server_service.db import CycleRow, EdgeRow, Session, UploadRow, utcnow
from server_service.logs import log_event
from server_service.runtime import Runtime
from server_service.services import cycle_state
from server_service.services.models import get_model, load_model, model_row, register_version
from server_service.storage import is_disk_full


class TrainingInterrupted(Exception):
    """The server is stopping; the cycle stays ``training`` and the next start resumes it."""


class LeaseLost(TrainingInterrupted):
    """Another replica took the cycle over (this one missed its heartbeats)."""


def submit_training(rt: Runtime, cycle_id: int) -> bool:
    """Queue a cycle in ``training`` state; False when it is already queued here."""
    with rt.lock:
        if cycle_id in rt.training_ids:
            return False
        rt.training_ids.add(cycle_id)
    try:
        rt.executor.submit(_train_guarded, rt, cycle_id)
    except RuntimeError:
        # The executor is shut down (server stopping): the cycle stays in `training`
        # and the next start trains it.
        with rt.lock:
            rt.training_ids.discard(cycle_id)
        return False
    return True


def _train_guarded(rt: Runtime, cycle_id: int) -> None:
    lease = leases.cycle_lease(cycle_id)
    try:
        ours = leases.acquire(rt.sessions, lease, rt.replica_id, rt.settings.lease_ttl_s)
    except Exception:
        # The database is unreachable: the watcher takes the cycle up again later.
        log_event("cycle.lease_error", logging.WARNING, cycle_id=cycle_id)
        ours = False
    if not ours:
        log_event("cycle.training_elsewhere", cycle_id=cycle_id)
        rt.drop(lease)
        with rt.lock:
            rt.training_ids.discard(cycle_id)
        return
    rt.hold(lease)
    try:
        train_cycle(rt, cycle_id)
    except LeaseLost:
        log_event("cycle.training_lost", logging.WARNING, cycle_id=cycle_id)
    except TrainingInterrupted:
        log_event("cycle.training_interrupted", cycle_id=cycle_id)
    except DBOperationalError as exc:
        # The database went away mid-training: not the cycle's fault. It stays
        # `training`; once the lease expires the watcher (here or elsewhere) retrains it.
        log_event(
            "cycle.training_interrupted",
            logging.WARNING,
            cycle_id=cycle_id,
            reason=f"database unavailable ({type(exc).__name__})",
        )
    except Exception as exc:  # a training thread must never take the server down
        disk_full = is_disk_full(exc)
        expected = disk_full or isinstance(exc, FedInspectError)
        if disk_full:
            detail = "the server's data dir is full (no space left on device)"
        elif isinstance(exc, FedInspectError):
            detail = exc.detail
        else:
            detail = repr(exc)
        reason = f"training failed: {detail}"
        # A traceback only for errors nobody raised on purpose.
        log_event(
            "cycle.training_failed",
            logging.ERROR,
            exc_info=not expected,
            cycle_id=cycle_id,
            reason=reason,
            data_dir=rt.settings.data_dir if disk_full else None,
        )
        _mark_failed(rt, cycle_id, reason)
    finally:
        # Released at once (done, failed, or stopping): a restart or another replica
        # need not wait for it to expire. A lost lease belongs to another replica.
        if rt.drop(lease):
            try:
                leases.release(rt.sessions, lease, rt.replica_id)
            except Exception:
                log_event("cycle.lease_release_error", logging.WARNING, cycle_id=cycle_id)
        with rt.lock:
            rt.training_ids.discard(cycle_id)


def _mark_failed(rt: Runtime, cycle_id: int, reason: str) -> bool:
    """Record a failed training; when even that cannot be written (a full disk), the
    deadline watcher tries again (:func:`record_failures`) rather than leave the cycle
    ``training`` for good."""
    try:
        with rt.sessions() as session:
            if cycle_state.move(
                session, cycle_id, CycleState.failed, [CycleState.training], reason=reason
            ):
                session.commit()
    except Exception as exc:
        with rt.lock:
            rt.unrecorded_failures[cycle_id] = reason
        log_event(
            "cycle.mark_failed_error",
            logging.ERROR,
            cycle_id=cycle_id,
            error=shorten(str(exc)),
            retry="by the deadline watcher",
        )
        return False
    with rt.lock:
        rt.unrecorded_failures.pop(cycle_id, None)
    return True


def record_failures(rt: Runtime) -> None:
    """Write the failed trainings that could not be recorded when they failed."""
    with rt.lock:
        pending = dict(rt.unrecorded_failures)
    for cycle_id, reason in pending.items():
        if _mark_failed(rt, cycle_id, reason):
            log_event("cycle.failed", cycle_id=cycle_id, reason=reason)


def train_cycle(rt: Runtime, cycle_id: int) -> None:
    """Train a cycle in ``training`` state and register the result (or discard it
    when the cycle was cancelled meanwhile)."""
    lease = leases.cycle_lease(cycle_id)
    if rt.stopping.is_set():
        raise TrainingInterrupted()
    started = time.perf_counter()
    with rt.sessions() as session:
        row = session.get(CycleRow, cycle_id)
        if row is None or row.state != CycleState.training.value:
            return
        spec = FeatureSpec.model_validate_json(row.spec_json)
        # in the order of the edges' names, which operators choose, not of their ids,
        # which have a random part: the same uploads and seed give the same model
        uploads = session.scalars(
            select(UploadRow)
            .outerjoin(EdgeRow, EdgeRow.id == UploadRow.edge_id)
            .where(UploadRow.cycle_id == cycle_id)
            .order_by(EdgeRow.name, UploadRow.edge_id)
        ).all()
        base = get_model(session, row.base_model_version)
    if not uploads:
        raise FedInspectError("the cycle has no uploads")
    log_event(
        "cycle.training_started", cycle_id=cycle_id, uploads=len(uploads), replica=rt.replica_id
    )
    rt.metrics.trainings_started.inc()

    decoded: list[Upload] = []
    rows_per_edge: dict[str, int] = {}
    for upload in uploads:
        batch = unpack_upload(rt.blobs.get(upload.sha256), spec, rt.settings.max_upload_rows)
        decoded.append(batch)
        rows_per_edge[upload.edge_id] = upload_rows(batch)
    features, labels = training_rows(decoded, seed=rt.settings.train_seed)
    del decoded

    def progress(fraction: float, message: str) -> None:
        # Called after every epoch: the place where a stopping server can cut in.
        if rt.stopping.is_set():
            raise TrainingInterrupted()
        rt.training_board.report(cycle_id, fraction, message)
        if rt.lost(lease):
            raise LeaseLost()
        log_event(
            "cycle.training_progress",
            logging.DEBUG,
            cycle_id=cycle_id,
            fraction=round(fraction, 3),
            message=message,
        )

    model = load_model(rt, base)
    report: TrainReport = train_upper(
        model,
        features,
        labels,
        rt.settings.upper_train_config(),
        progress=progress,
    )
    # Still ours? A replica that lost the lease must not register a second result.
    if leases.renew(rt.sessions, [lease], rt.replica_id, rt.settings.lease_ttl_s):
        raise LeaseLost()
    weights = model_to_bytes(model)
    sha = rt.blobs.put(weights)
    trained_from = TrainedFrom(
        cycle_id=cycle_id,
        edges=sorted(rows_per_edge),
        rows_per_edge=rows_per_edge,
        rows_train=report.rows_train,
        rows_val=report.rows_val,
    )
    version, target = _register(
        rt, cycle_id, base.version, model, sha, len(weights), report.metrics, trained_from, spec
    )
    elapsed = time.perf_counter() - started
    rt.metrics.training_seconds.observe(elapsed)
    if version is None:
        log_event("cycle.training_discarded", cycle_id=cycle_id, reason="cycle left training")
        return
    log_event(
        # a cycle with federated rounds is done when its last round is aggregated
        "cycle.done" if target == CycleState.done else "cycle.rounds_started",
        cycle_id=cycle_id,
        model_version=version,
        rows_train=report.rows_train,
        rows_val=report.rows_val,
        accuracy=None if report.metrics is None else round(report.metrics.accuracy, 4),
        seconds=round(elapsed, 3),
    )


def _register(
    rt: Runtime,
    cycle_id: int,
    parent: int,
    model: SplitModel,
    sha: str,
    size: int,
    metrics: EvalMetrics | None,
    trained_from: TrainedFrom,
    spec: FeatureSpec,
) -> tuple[int | None, CycleState]:
    """Insert the model version and mark the cycle done (or at its first round) in one
    transaction; the version (None when the cycle had left training) and the state."""
    with rt.sessions() as session:
        plan_json = session.scalar(select(CycleRow.plan_json).where(CycleRow.id == cycle_id))
    # done, or on to round 1 when the cycle's plan has federated rounds
    target = cycle_state.after_head(plan_json, 0, utcnow())[0]

    def claim(session: Session, version: int) -> bool:
        _, values = cycle_state.after_head(plan_json, version, utcnow())
        values["metrics_json"] = metrics.model_dump_json() if metrics else None
        return cycle_state.move(session, cycle_id, target, [CycleState.training], **values)

    version = register_version(
        rt,
        claim,
        lambda v: model_row(v, parent, model, sha, size, metrics, trained_from, spec.privacy),
    )
    if version is not None:
        log_event("model.registered", cycle_id=cycle_id, version=version, parent=parent, sha256=sha)
    return version, target


__all__ = [
    "LeaseLost",
    "TrainingInterrupted",
    "record_failures",
    "submit_training",
    "train_cycle",
]
