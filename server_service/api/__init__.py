"""HTTP layer of the server: dependencies (``deps``), routers (``routes``)."""
