"""The edge's database (SQLAlchemy 2.0, SQLite by default): jobs, local models, and a
small key-value table for state such as the last gate decision. The schema is changed
only by migrations (``edge_service/migrations``), run when the store opens.

Every write commits at once, so a job's last stage and progress survive a kill; the
:class:`EdgeStore` methods return wire models from ``fl_core.schemas``, never ORM rows,
so no session outlives a call.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    Float,
    Integer,
    String,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from edge_service.migrations import first_schema
from fedinspect.service import UTCDateTime, log_event, make_engine, utcnow
from fl_core.errors import NotFound
from fl_core.migrations import migrate
from fl_core.schemas import CycleJobResult, EvalMetrics, Job, JobKind, JobState, LocalModel

log = logging.getLogger("edge_service.db")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(32), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[str] = mapped_column(Text, default="{}")
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LocalModelRow(Base):
    __tablename__ = "local_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    metrics: Mapped[str | None] = mapped_column(Text, nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")


class StateRow(Base):
    __tablename__ = "state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def _job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        kind=JobKind(row.kind),
        state=JobState(row.state),
        stage=row.stage,
        progress=min(1.0, max(0.0, row.progress)),
        message=row.message,
        result=json.loads(row.result) if row.result else None,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _local_model(row: LocalModelRow) -> LocalModel:
    source: Literal["base", "finetuned"] = "base" if row.source == "base" else "finetuned"
    return LocalModel(
        id=row.id,
        base_version=row.base_version,
        source=source,
        sha256=row.sha256,
        created_at=row.created_at,
        active=row.active,
        metrics=EvalMetrics.model_validate_json(row.metrics) if row.metrics else None,
        note=row.note,
    )


def migrate_store(engine: Engine) -> None:
    """Bring the store to the newest schema revision (edge_service/migrations); a store
    made before migrations is adopted (:func:`fl_core.migrations.migrate`)."""
    with engine.begin() as conn:
        # the edge's first schema has no unique index that old rows could break
        migration = migrate(conn, "edge_service", first_schema.metadata)
    if migration.before != migration.after:
        log_event(
            log,
            "store.migrated",
            before=migration.before,
            after=migration.after,
            adopted=migration.adopted,
        )


class EdgeStore:
    """All reads and writes of the edge's state."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        migrate_store(engine)
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # SQLite allows one writer; serialising here avoids "database is locked".
        self._write_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> EdgeStore:
        """The store in the SQLite file ``path`` (with the server's engine settings)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(make_engine(f"sqlite:///{path}"))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------ jobs

    def create_job(self, kind: JobKind, params: dict[str, Any] | None = None) -> Job:
        now = utcnow()
        row = JobRow(
            id=uuid.uuid4().hex,
            kind=kind.value,
            state=JobState.queued.value,
            stage="",
            progress=0.0,
            message="queued",
            params=json.dumps(params or {}),
            created_at=now,
            updated_at=now,
        )
        with self._write() as s:
            s.add(row)
        return _job(row)

    def get_job(self, job_id: str) -> Job:
        with self._sessions() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job {job_id}")
            return _job(row)

    def job_params(self, job_id: str) -> dict[str, Any]:
        with self._sessions() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job {job_id}")
            params: dict[str, Any] = json.loads(row.params)
            return params

    def list_jobs(self, limit: int = 100) -> list[Job]:
        with self._sessions() as s:
            rows = s.scalars(select(JobRow).order_by(JobRow.created_at.desc()).limit(limit))
            return [_job(r) for r in rows]

    def last_job(self) -> Job | None:
        jobs = self.list_jobs(limit=1)
        return jobs[0] if jobs else None

    def update_job(
        self,
        job_id: str,
        *,
        state: JobState | None = None,
        stage: str | None = None,
        progress: float | None = None,
        message: str | None = None,
        result: CycleJobResult | None = None,
        error: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"updated_at": utcnow()}
        if state is not None:
            values["state"] = state.value
        if stage is not None:
            values["stage"] = stage
        if progress is not None:
            values["progress"] = progress
        if message is not None:
            values["message"] = message
        if result is not None:
            values["result"] = result.model_dump_json()
        if error is not None:
            values["error"] = error
        with self._write() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))

    def fail_interrupted_jobs(self) -> list[str]:
        """Mark jobs left queued/running by a killed process as failed; returns their ids."""
        with self._write() as s:
            rows = s.scalars(
                select(JobRow).where(
                    JobRow.state.in_([JobState.queued.value, JobState.running.value])
                )
            ).all()
            for row in rows:
                during = row.stage or "queued"
                row.state = JobState.failed.value
                row.error = f"interrupted: the edge restarted during {during}"
                row.message = row.error
                row.updated_at = utcnow()
            return [r.id for r in rows]

    def count_jobs_by_state(self) -> dict[str, int]:
        with self._sessions() as s:
            rows = s.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        counts = {state.value: 0 for state in JobState}
        for state, n in rows:  # rows written as "succeeded" count as "done"
            key = JobState(state).value
            counts[key] = counts.get(key, 0) + int(n)
        return counts

    # ------------------------------------------------------------------ local models

    def add_model(
        self,
        *,
        sha256: str,
        base_version: int | None,
        source: Literal["base", "finetuned"],
        metrics: EvalMetrics | None,
        note: str = "",
    ) -> LocalModel:
        row = LocalModelRow(
            base_version=base_version,
            source=source,
            sha256=sha256,
            created_at=utcnow(),
            active=False,
            metrics=metrics.model_dump_json() if metrics else None,
            note=note,
        )
        with self._write() as s:
            s.add(row)
            s.flush()
        return _local_model(row)

    def get_model(self, model_id: int) -> LocalModel:
        with self._sessions() as s:
            row = s.get(LocalModelRow, model_id)
            if row is None:
                raise NotFound(f"no local model {model_id}")
            return _local_model(row)

    def list_models(self) -> list[LocalModel]:
        with self._sessions() as s:
            return [
                _local_model(r) for r in s.scalars(select(LocalModelRow).order_by(LocalModelRow.id))
            ]

    def active_model(self) -> LocalModel | None:
        with self._sessions() as s:
            row = s.scalars(select(LocalModelRow).where(LocalModelRow.active)).first()
            return _local_model(row) if row else None

    def set_active(self, model_id: int) -> int | None:
        """Make ``model_id`` the only active model; returns the previously active id."""
        with self._write() as s:
            row = s.get(LocalModelRow, model_id)
            if row is None:
                raise NotFound(f"no local model {model_id}")
            previous = s.scalars(select(LocalModelRow.id).where(LocalModelRow.active)).first()
            s.execute(update(LocalModelRow).values(active=False))
            row.active = True
            return previous

    def update_model(
        self, model_id: int, *, metrics: EvalMetrics | None = None, note: str | None = None
    ) -> None:
        values: dict[str, Any] = {}
        if metrics is not None:
            values["metrics"] = metrics.model_dump_json()
        if note is not None:
            values["note"] = note
        if values:
            with self._write() as s:
                s.execute(
                    update(LocalModelRow).where(LocalModelRow.id == model_id).values(**values)
                )

    # ------------------------------------------------------------------ key-value state

    def get_state(self, key: str) -> Any:
        with self._sessions() as s:
            row = s.get(StateRow, key)
            return json.loads(row.value) if row else None

    def set_state(self, key: str, value: Any) -> None:
        with self._write() as s:
            s.merge(StateRow(key=key, value=json.dumps(value)))


__all__ = [
    "Base",
    "EdgeStore",
    "JobRow",
    "LocalModelRow",
    "StateRow",
    "migrate_store",
]
