"""Revision 0001 (2026-12-02), the first: the edge's tables as ``create_all`` made them
before migrations (:mod:`edge_service.migrations.first_schema`)."""

from edge_service.migrations.first_schema import metadata
from fl_core.migrations import FIRST_REVISION, first_revision

revision: str = FIRST_REVISION
down_revision: str | None = None
upgrade, downgrade = first_revision(metadata)
