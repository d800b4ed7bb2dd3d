"""Revision 0001 (2026-12-02), the first: the server's tables as ``create_all`` made them
before migrations (:mod:`server_service.migrations.first_schema`)."""

from fl_core.migrations import FIRST_REVISION, first_revision
from server_service.migrations.first_schema import metadata

revision: str = FIRST_REVISION
down_revision: str | None = None
upgrade, downgrade = first_revision(metadata)
