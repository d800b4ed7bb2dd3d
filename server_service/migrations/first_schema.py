"""The server's first schema (revision 0001), frozen: the tables and indexes that
``create_all`` made before migrations existed.

Never edit this file: later changes are new revisions. It creates revision 0001 and
completes a database made by an earlier release before it is stamped (see
:func:`fl_core.migrations.migrate`).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

Table(
    "edges",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False),
    Index(
        "one_active_edge_name",
        "name",
        unique=True,
        sqlite_where=text("revoked = 0"),
        postgresql_where=text("NOT revoked"),
    ),
)

Table(
    "cycles",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("state", String(16), nullable=False),
    Column("base_model_version", Integer, nullable=False),
    Column("spec_json", Text, nullable=False),
    Column("spec_hash", String(64), nullable=False),
    Column("min_edges", Integer, nullable=False),
    Column("deadline", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("result_model_version", Integer, nullable=True),
    Column("metrics_json", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Index("ix_cycles_state", "state"),
    Index(
        "one_collecting_cycle",
        "state",
        unique=True,
        sqlite_where=text("state = 'collecting'"),
        postgresql_where=text("state = 'collecting'"),
    ),
)

Table(
    "cycle_members",
    metadata,
    Column("cycle_id", Integer, ForeignKey("cycles.id"), primary_key=True),
    Column("edge_id", String(32), ForeignKey("edges.id"), primary_key=True),
    Column("joined_at", DateTime(timezone=True), nullable=False),
)

Table(
    "uploads",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("cycle_id", Integer, ForeignKey("cycles.id"), nullable=False),
    Column("edge_id", String(32), ForeignKey("edges.id"), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("cycle_id", "edge_id", name="one_upload_per_edge"),
    Index("ix_uploads_cycle_id", "cycle_id"),
)

Table(
    "models",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("parent", Integer, nullable=True),
    Column("backbone", String(64), nullable=False),
    Column("cut", String(64), nullable=False),
    Column("input_size", Integer, nullable=False),
    Column("class_names_json", Text, nullable=False),
    Column("metrics_json", Text, nullable=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("trained_from_json", Text, nullable=True),
    Column("privacy_json", Text, nullable=True),
)

Table(
    "edge_evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("edge_id", String(32), ForeignKey("edges.id"), nullable=False),
    Column("model_version", Integer, nullable=False),
    Column("report_json", Text, nullable=False),
    Column("reported_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("edge_id", "model_version", name="one_report_per_model"),
    Index("ix_edge_evaluations_edge_id", "edge_id"),
)

Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

__all__ = ["metadata"]
