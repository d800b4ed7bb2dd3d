"""Starlette's TestClient, imported without the warnings of its dependencies' churn.

Starlette asks for httpx2 in its test client (this project pins httpx; the API is the
same), and anyio 4.16 deprecated the ``anyio.abc.BlockingPortal`` alias that
starlette's test client module reads at import. Neither says anything about our code,
and ``pytest -W error`` would turn them into collection errors.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message="Using `httpx` with `starlette.testclient` is deprecated"
    )
    warnings.filterwarnings("ignore", message="The anyio.abc.BlockingPortal alias is deprecated")
    from starlette.testclient import TestClient

__all__ = ["TestClient"]
