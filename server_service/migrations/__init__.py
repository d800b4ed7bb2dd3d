"""The server's schema migrations (Alembic), run at start by :mod:`server_service.db`.

``versions/`` holds one file per revision; ``first_schema`` freezes the tables of the
first revision. How to add a revision: docs/scaling.md, "Schema migrations".
"""
