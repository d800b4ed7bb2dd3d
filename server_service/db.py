"""Database schema and engine: SQLAlchemy 2.0 over SQLite (default) or PostgreSQL.

Tables: ``edges``, ``cycles``, ``cycle_members``, ``uploads``, ``models`` and
``edge_evaluations``. Only portable SQL is used; SQLite gets WAL and a busy timeout so
the API threads, the training thread and the deadline watcher can share one file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as Session


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class EdgeRow(Base):
    __tablename__ = "edges"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    # Only the sha256 of the token is kept: a leaked database does not leak tokens.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class CycleRow(Base):
    __tablename__ = "cycles"
    __table_args__ = (
        # At most one collecting cycle, enforced by the database so that concurrent
        # requests (or replicas) cannot open two.
        Index(
            "one_collecting_cycle",
            "state",
            unique=True,
            sqlite_where=text("state = 'collecting'"),
            postgresql_where=text("state = 'collecting'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    base_model_version: Mapped[int] = mapped_column(Integer)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    min_edges: Mapped[int] = mapped_column(Integer)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    result_model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class CycleMemberRow(Base):
    __tablename__ = "cycle_members"

    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), primary_key=True)
    edge_id: Mapped[str] = mapped_column(ForeignKey("edges.id"), primary_key=True)
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UploadRow(Base):
    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("cycle_id", "edge_id", name="one_upload_per_edge"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), index=True)
    edge_id: Mapped[str] = mapped_column(ForeignKey("edges.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelRow(Base):
    __tablename__ = "models"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    backbone: Mapped[str] = mapped_column(String(64))
    cut: Mapped[str] = mapped_column(String(64))
    input_size: Mapped[int] = mapped_column(Integer)
    class_names_json: Mapped[str] = mapped_column(Text)
    metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    trained_from_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    privacy_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class EdgeEvaluationRow(Base):
    """An edge's stage-3 report on a server model version (metrics only), one per pair."""

    __tablename__ = "edge_evaluations"
    __table_args__ = (UniqueConstraint("edge_id", "model_version", name="one_report_per_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    edge_id: Mapped[str] = mapped_column(ForeignKey("edges.id"), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    report_json: Mapped[str] = mapped_column(Text)
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed (acknowledged) row survives a power cut, not only a kill -9.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and cross-thread use."""
    if url.startswith("sqlite"):
        # Connections must outnumber what admitted requests can hold at once (up to two
        # each, plus training and the watcher): a request waiting for a pooled
        # connection holds a worker thread, and enough of those starve the very
        # requests that would give connections back. SQLite connections are cheap.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=10,
            max_overflow=90,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def create_schema(engine: Engine) -> None:
    Base.metadata.create_all(engine)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


__all__ = [
    "Base",
    "CycleMemberRow",
    "CycleRow",
    "EdgeEvaluationRow",
    "EdgeRow",
    "ModelRow",
    "Session",
    "UTCDateTime",
    "UploadRow",
    "create_schema",
    "make_engine",
    "make_sessionmaker",
    "utcnow",
]
