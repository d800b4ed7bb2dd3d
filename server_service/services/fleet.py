"""The fleet view: edges' evaluation reports, their activity, and one overview for the
dashboard.

An edge reports, after stage 3, the test metrics of the models its deploy gate weighed
for a server model version (:func:`store_report`); the report replaces that edge's
earlier one for the same version. "Last seen" is an edge's latest recorded act (joining
a cycle, uploading, reporting): reading requests are not recorded, so that polling
costs no database write.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select

from fl_core.errors import NotFound
from fl_core.schemas import (
    EdgeActivity,
    EdgeEvaluation,
    EdgeEvaluationReport,
    Overview,
)
from server_service.db import (
    CycleMemberRow,
    EdgeEvaluationRow,
    EdgeRow,
    ModelRow,
    Session,
    UploadRow,
    utcnow,
)
from server_service.logs import log_event
from server_service.services import cycles, models
from server_service.services.models import to_info
from server_service.services.progress import TrainingBoard


def _evaluation(session: Session, row: EdgeEvaluationRow) -> EdgeEvaluation:
    model = session.get(ModelRow, row.model_version)
    info = to_info(model) if model is not None else None
    cycle_id = info.trained_from.cycle_id if info and info.trained_from else None
    report = EdgeEvaluationReport.model_validate_json(row.report_json)
    return EdgeEvaluation(
        report=report,
        edge_id=row.edge_id,
        model_version=row.model_version,
        cycle_id=cycle_id,
        reported_at=row.reported_at,
    )


def store_report(
    session: Session, edge_id: str, version: int, report: EdgeEvaluationReport
) -> EdgeEvaluation:
    """Keep ``edge_id``'s report on model ``version`` (replacing an earlier one)."""
    if session.get(ModelRow, version) is None:
        raise NotFound(f"model {version} not found")
    row = session.scalar(
        select(EdgeEvaluationRow).where(
            EdgeEvaluationRow.edge_id == edge_id, EdgeEvaluationRow.model_version == version
        )
    )
    if row is None:
        row = EdgeEvaluationRow(edge_id=edge_id, model_version=version)
        session.add(row)
    row.report_json = report.model_dump_json()
    row.reported_at = utcnow()
    session.commit()
    deployed = report.metrics.get("deployed")
    log_event(
        "edge.evaluation_reported",
        edge_id=edge_id,
        model_version=version,
        chosen=report.chosen,
        test_accuracy=None if deployed is None else round(deployed.accuracy, 4),
    )
    return _evaluation(session, row)


def list_evaluations(session: Session, limit: int = 1000) -> list[EdgeEvaluation]:
    """Reports, oldest model version first."""
    rows = session.scalars(
        select(EdgeEvaluationRow)
        .order_by(EdgeEvaluationRow.model_version.desc(), EdgeEvaluationRow.edge_id)
        .limit(limit)
    ).all()
    return [_evaluation(session, r) for r in reversed(rows)]


def _latest(values: list[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def edge_activity(session: Session, evaluations: list[EdgeEvaluation]) -> list[EdgeActivity]:
    """Every registered edge with its latest acts and the model it reported serving."""
    joined = dict(
        session.execute(
            select(CycleMemberRow.edge_id, func.max(CycleMemberRow.joined_at)).group_by(
                CycleMemberRow.edge_id
            )
        ).all()
    )
    last_cycle = dict(
        session.execute(
            select(CycleMemberRow.edge_id, func.max(CycleMemberRow.cycle_id)).group_by(
                CycleMemberRow.edge_id
            )
        ).all()
    )
    uploaded = dict(
        session.execute(
            select(UploadRow.edge_id, func.max(UploadRow.received_at)).group_by(UploadRow.edge_id)
        ).all()
    )
    latest_report: dict[str, EdgeEvaluation] = {}
    serving_version: dict[str, int] = {}
    for ev in evaluations:  # oldest first: the last one per edge wins
        latest_report[ev.edge_id] = ev
        if ev.report.chosen in ("candidate", "server_model"):  # "previous": the older one stays
            serving_version[ev.edge_id] = ev.model_version
    out = []
    for edge in session.scalars(select(EdgeRow).order_by(EdgeRow.created_at, EdgeRow.id)):
        report = latest_report.get(edge.id)
        serving = report.report.metrics.get("deployed") if report else None
        out.append(
            EdgeActivity(
                edge_id=edge.id,
                name=edge.name,
                created_at=edge.created_at,
                revoked=edge.revoked,
                last_seen=_latest(
                    [
                        _aware(joined.get(edge.id)),
                        _aware(uploaded.get(edge.id)),
                        report.reported_at if report else None,
                    ]
                ),
                last_upload=_aware(uploaded.get(edge.id)),
                last_cycle_id=last_cycle.get(edge.id),
                deployed_model_version=serving_version.get(edge.id),
                test_accuracy=serving.accuracy if serving is not None else None,
                reported_at=report.reported_at if report else None,
            )
        )
    return out


def _aware(value: datetime | None) -> datetime | None:
    # aggregates bypass the column type: SQLite hands back naive UTC datetimes (or text)
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def overview(session: Session, board: TrainingBoard, cycle_limit: int = 20) -> Overview:
    evaluations = list_evaluations(session)
    return Overview(
        now=utcnow(),
        edges=edge_activity(session, evaluations),
        cycles=cycles.list_cycles(session, None, cycle_limit),
        models=models.list_models(session),
        evaluations=evaluations,
        training=board.snapshot(),
    )


__all__ = [
    "edge_activity",
    "list_evaluations",
    "overview",
    "store_report",
]
