"""FedInspect training-cycle server (FastAPI).

``create_app(settings)`` builds the app, ``run(settings)`` serves it; settings come
from ``FEDINSPECT_SERVER_*`` environment variables (:class:`Settings`).
"""

from server_service.config import Settings

__all__ = ["Settings"]
