"""The edge's schema migrations (Alembic), run when :class:`edge_service.db.EdgeStore`
opens its SQLite file.

``versions/`` holds one file per revision; ``first_schema`` freezes the tables of the
first revision. How to add a revision: docs/scaling.md, "Schema migrations".
"""
