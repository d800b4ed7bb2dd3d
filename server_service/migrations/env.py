"""Alembic's environment for the server's database: see :func:`fl_core.migrations.run_env`."""

from fl_core.migrations import run_env
from server_service.db import Base

run_env(Base.metadata)
