"""The server's storage: opened and checked at start, and its failures said plainly.

:func:`open_storage` creates or upgrades the schema, and refuses in one line what a
server must not start on: a database it cannot open or read, and a new, empty database
beside a blob store that already holds blobs (a deleted or replaced database; starting
anew would invalidate every edge's token) unless ``ALLOW_NEW_DATABASE`` says so.
:func:`database_unavailable` answers requests while the database is away: 503 with
``Retry-After``.

A full disk under the data dir (:func:`is_disk_full`): blob writes raise
:class:`InsufficientStorage` (ENOSPC or EDQUOT); SQLite says ``database or disk is
full``. Either way nothing of the failed request is stored (the blob's temporary file
is removed, the transaction rolled back), so the client may retry once an operator has
freed space.
"""

from __future__ import annotations

import errno
import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError, OperationalError

from fedinspect.service import error_reply
from fl_core.blobstore import BlobStore, open_blob_store
from fl_core.errors import ConfigError, InsufficientStorage
from server_service.config import Settings
from server_service.db import make_engine, migrate_schema
from server_service.logs import log_event


def open_storage(settings: Settings) -> tuple[Engine, BlobStore]:
    """Open the blob store and the database, creating or migrating the schema.

    Refuses (ConfigError, one line) a database that cannot be opened, and a new,
    empty database beside a blob store that holds blobs unless ALLOW_NEW_DATABASE.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    blobs = open_blob_store(settings.blob_url, settings.blob_dir, settings.s3_endpoint_url)
    engine = make_engine(settings.sqlalchemy_url)
    where = engine.url.render_as_string(hide_password=True)
    if engine.url.get_backend_name() == "sqlite":
        where = f"file {engine.url.database}"

    def refuse_new_database() -> None:
        if not settings.allow_new_database and blobs.any_blob():
            raise ConfigError(
                f"the database {where} is empty (deleted or replaced?) but the blob store "
                f"{blobs.describe()} holds blobs: restore the database from a backup, or set "
                "FEDINSPECT_SERVER_ALLOW_NEW_DATABASE=true to start anew (every edge must "
                "then register again)"
            )

    try:
        migration = migrate_schema(engine, before_create=refuse_new_database)
    except OperationalError as exc:
        engine.dispose()
        raise ConfigError(
            f"cannot open the database {where} ({_first_line(exc)}): check "
            "FEDINSPECT_SERVER_DATABASE_URL, that the database is running, and permissions"
        ) from None
    except DatabaseError as exc:
        engine.dispose()
        raise ConfigError(
            f"the database {where} is unreadable ({_first_line(exc)}): restore it from a "
            "backup, or move it aside and start with FEDINSPECT_SERVER_ALLOW_NEW_DATABASE=true"
        ) from None
    except BaseException:
        engine.dispose()
        raise
    if migration.before != migration.after and not migration.skipped:
        log_event(
            "database.migrated",
            database=where,
            before=migration.before,
            after=migration.after,
            adopted=migration.adopted or None,
        )
    for problem in migration.skipped:
        # Rows written before the index existed break it (two active edges of one
        # name): the server runs without it, and says what to do.
        log_event(
            "database.index_missing",
            logging.WARNING,
            index=problem,
            fix="revoke the duplicate edges (DELETE /v1/edges/{id}) and restart",
        )
    return engine, blobs


def _first_line(exc: DatabaseError) -> str:
    return str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc).__name__


def database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    # Lost connections (a restarting PostgreSQL): the client retries; pre_ping gives
    # the next request a fresh connection once the database is back.
    log_event("database.unavailable", logging.WARNING, error=type(exc).__name__)
    return error_reply(503, "database unavailable; retry later")  # with Retry-After


#: what clients are told: the setting, not the path on this machine
DISK_FULL_DETAIL = (
    "the server's data dir (FEDINSPECT_SERVER_DATA_DIR) is full: nothing of this request "
    "was stored; retry once an operator has freed space"
)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write that failed for lack of space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, InsufficientStorage):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, OperationalError) and "full" in str(current.orig).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


__all__ = [
    "DISK_FULL_DETAIL",
    "database_unavailable",
    "is_disk_full",
    "open_storage",
]
