"""Schema migrations (Alembic), run from code when a service opens its database.

Each service keeps its migration environment inside its package
(``server_service/migrations``, ``edge_service/migrations``) so that an installed wheel
can migrate; no ``alembic.ini`` is read at run time. :func:`migrate` brings a database
to the newest revision:

- an empty database is upgraded from the base (``on_new`` may refuse it first);
- a database made before migrations existed (the service's tables, no
  ``alembic_version``) is adopted: missing tables and indexes of the first schema are
  created, it is stamped at :data:`FIRST_REVISION`, then upgraded;
- a versioned database is upgraded.

The caller runs it inside one transaction, holding whatever lock keeps two processes
from migrating one database at once (the server takes a PostgreSQL advisory lock), and
logs what the returned :class:`Migration` says (alembic's own INFO lines are left to
the ``alembic`` logger, which the services set to WARNING).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, create_engine, inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex

from fl_core.errors import ConfigError

#: every service's first revision: the schema its ``create_all`` made before migrations
FIRST_REVISION = "0001"


def migration_config(package: str, conn: Connection | None = None) -> Config:
    """Alembic's configuration for ``<package>/migrations``, built in code.

    ``conn``: the connection (in a transaction) the migrations run on.
    """
    config = Config()
    config.set_main_option("script_location", f"{package}:migrations")
    if conn is not None:
        config.attributes["connection"] = conn
    return config


def head_revision(package: str) -> str | None:
    return ScriptDirectory.from_config(migration_config(package)).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate` did."""

    #: the revision found (None: a new database, or one made before migrations)
    before: str | None
    #: the revision left (None: an adopted database left unversioned, see ``skipped``)
    after: str | None
    #: the database was made before migrations (tables, no ``alembic_version``)
    adopted: bool = False
    #: unique indexes of the first schema that its rows break ("name: reason")
    skipped: list[str] = field(default_factory=list)


def migrate(
    conn: Connection,
    package: str,
    first_schema: MetaData,
    on_new: Callable[[], None] | None = None,
) -> Migration:
    """Bring the database on ``conn`` to the newest revision of ``package``'s migrations.

    ``first_schema``: the tables of :data:`FIRST_REVISION`, frozen, to adopt a database
    made before migrations. ``on_new`` runs when the database holds none of them, before
    anything is created; it may refuse (raise). A database made before migrations whose
    rows break a unique index of the first schema is left unversioned (``skipped`` says
    which), to be adopted again at the next start once the rows are fixed.
    """
    config = migration_config(package, conn)
    before = current_revision(conn)
    scripts = ScriptDirectory.from_config(config)
    if before is not None and before not in {s.revision for s in scripts.walk_revisions()}:
        # a newer release migrated it (then was rolled back?): upgrading cannot help
        raise ConfigError(
            f"the database is at schema revision {before}, which this release does not "
            f"know (its newest is {scripts.get_current_head()}): run the release that "
            "migrated it, or restore a backup made before"
        )
    adopted = False
    if before is None:
        existing = set(inspect(conn).get_table_names())
        adopted = bool(existing & set(first_schema.tables))
        if adopted:
            skipped = _adopt(conn, first_schema)
            if skipped:
                if scripts.get_current_head() != FIRST_REVISION:
                    raise ConfigError(
                        "cannot migrate the database: rows break the unique indexes "
                        f"{'; '.join(skipped)}; fix those rows, then start again"
                    )
                return Migration(before=None, after=None, adopted=True, skipped=skipped)
            command.stamp(config, FIRST_REVISION)
        elif on_new is not None:
            on_new()
    command.upgrade(config, "head")
    return Migration(before=before, after=current_revision(conn), adopted=adopted)


def _adopt(conn: Connection, first_schema: MetaData) -> list[str]:
    """Complete a database made by an earlier ``create_all`` to the first schema.

    Releases before the first revision created missing tables and indexes at every
    start, so such a database may lack the ones added last.
    """
    first_schema.create_all(conn, checkfirst=True)
    skipped = []
    for table in first_schema.sorted_tables:
        for index in table.indexes:
            try:
                with _savepoint(conn):
                    conn.execute(CreateIndex(index, if_not_exists=True))
            except IntegrityError as exc:
                reason = str(exc.orig).strip().splitlines()[0]
                skipped.append(f"{index.name}: {reason}")
    return skipped


@contextmanager
def _savepoint(conn: Connection) -> Iterator[None]:
    # On PostgreSQL a failed statement aborts the transaction unless it ran in a
    # savepoint; pysqlite's savepoints are unreliable, and SQLite needs none here.
    with conn.begin_nested() if conn.dialect.name == "postgresql" else nullcontext():
        yield


def run_env(target_metadata: MetaData) -> None:
    """The body of a service's ``migrations/env.py``.

    At run time :func:`migrate` passes its connection. From the command line (new
    revisions, see docs/scaling.md) the database comes from ``-x url=...``.
    """
    from alembic import context

    conn = context.config.attributes.get("connection")
    if conn is not None:
        _run_migrations(context, conn, target_metadata)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url or context.is_offline_mode():
        raise SystemExit("name the database to migrate or compare with: -x url=sqlite:///...")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run_migrations(context, conn, target_metadata)
    finally:
        engine.dispose()


def first_revision(first_schema: MetaData) -> tuple[Callable[[], None], Callable[[], None]]:
    """``upgrade`` and ``downgrade`` of a service's revision 0001 (:data:`FIRST_REVISION`):
    create, or drop, the service's frozen first schema."""
    from alembic import op

    def upgrade() -> None:
        first_schema.create_all(op.get_bind())

    def downgrade() -> None:
        first_schema.drop_all(op.get_bind())

    return upgrade, downgrade


def _run_migrations(context: Any, conn: Connection, target_metadata: MetaData) -> None:
    # Batch mode: SQLite alters a table by copying it, and autogenerate writes the
    # batch form that works on both backends.
    context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


__all__ = [
    "FIRST_REVISION",
    "Migration",
    "current_revision",
    "first_revision",
    "head_revision",
    "migrate",
    "migration_config",
    "run_env",
]
