"""The edge's first schema (revision 0001), frozen: the tables and indexes that
``create_all`` made before migrations existed.

Never edit this file: later changes are new revisions. It creates revision 0001 and
completes a store made by an earlier release before it is stamped (see
:func:`fl_core.migrations.migrate`).
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("stage", String(32), nullable=False),
    Column("progress", Float, nullable=False),
    Column("message", Text, nullable=False),
    Column("params", Text, nullable=False),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_created_at", "created_at"),
)

Table(
    "local_models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("base_version", Integer, nullable=True),
    Column("source", String(16), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("metrics", Text, nullable=True),
    Column("note", Text, nullable=False),
    Index("ix_local_models_active", "active"),
)

Table(
    "state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

__all__ = ["metadata"]
