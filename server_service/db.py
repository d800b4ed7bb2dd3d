"""Database schema and engine: SQLAlchemy 2.0 over SQLite (default) or PostgreSQL.

Tables: ``edges``, ``cycles``, ``cycle_members``, ``uploads``, ``models`` and
``edge_evaluations``, ``leases`` and ``round_updates``. Only portable SQL is used; the engine
(:func:`fedinspect.service.make_engine`, as on the edge) gives SQLite WAL and a busy
timeout so the API threads, the training thread and the deadline watcher can share one
file. The schema is changed only by migrations (``server_service/migrations``, run at
start by :func:`migrate_schema`). On PostgreSQL several server replicas share the
database: they migrate under an advisory lock, and :mod:`server_service.leases` decides
which replica trains a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as Session

from fedinspect.service import UTCDateTime, make_engine, utcnow
from fl_core.migrations import Migration, migrate
from server_service.migrations import first_schema


class Base(DeclarativeBase):
    pass


class EdgeRow(Base):
    __tablename__ = "edges"
    __table_args__ = (
        # One active edge per name, enforced by the database: of concurrent
        # registrations (on one replica or several) exactly one succeeds.
        Index(
            "one_active_edge_name",
            "name",
            unique=True,
            sqlite_where=text("revoked = 0"),
            postgresql_where=text("NOT revoked"),
        ),
    )

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
    #: fl_core.schemas.RoundPlan as JSON; None: a cycle opened before rounds existed
    plan_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    round_model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    round_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: JSON list of the cycle's model versions: the head's, then each round's
    round_versions_json: Mapped[str | None] = mapped_column(Text, nullable=True)


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


class RoundUpdateRow(Base):
    """One edge's update of one federated round (its bytes in the blob store)."""

    __tablename__ = "round_updates"
    __table_args__ = (
        UniqueConstraint("cycle_id", "round", "edge_id", name="one_update_per_edge_and_round"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    edge_id: Mapped[str] = mapped_column(ForeignKey("edges.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(Integer)
    norm: Mapped[float] = mapped_column(Float)
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


class LeaseRow(Base):
    """A named lease (``cycle:<id>``, ``watcher``): held by one replica until it expires.

    The holder renews it (heartbeat); another replica may take it once it has expired.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


#: key of the PostgreSQL advisory lock held while the schema is migrated
_SCHEMA_LOCK = 0x0FED1257


def migrate_schema(engine: Engine, before_create: Callable[[], None] | None = None) -> Migration:
    """Bring the database to the newest schema revision (server_service/migrations).

    ``before_create`` runs when the database has no tables yet, before any is made:
    it may refuse (raise) to initialise a new database. A database made before
    migrations is adopted (:func:`fl_core.migrations.migrate`). On PostgreSQL an
    advisory lock, held for the one transaction the migration runs in, serialises
    replicas that start at once: the first migrates, the others then find it done.
    The unique indexes that rows of an adopted database break are left out
    (``Migration.skipped``, with the database's reason), for the caller to report.
    """
    with engine.begin() as conn:
        _schema_lock(conn)
        return migrate(conn, "server_service", first_schema.metadata, on_new=before_create)


def _schema_lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


__all__ = [
    "Base",
    "CycleMemberRow",
    "CycleRow",
    "EdgeEvaluationRow",
    "EdgeRow",
    "LeaseRow",
    "ModelRow",
    "RoundUpdateRow",
    "Session",
    "UTCDateTime",
    "UploadRow",
    "make_engine",
    "make_sessionmaker",
    "migrate_schema",
    "utcnow",
]
