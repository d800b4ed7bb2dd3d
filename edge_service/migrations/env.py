"""Alembic's environment for the edge's database: see :func:`fl_core.migrations.run_env`."""

from edge_service.db import Base
from fl_core.migrations import run_env

run_env(Base.metadata)
