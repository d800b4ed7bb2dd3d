"""The edge's HTTP API: routers in ``routes/``, dependencies in ``deps``."""
