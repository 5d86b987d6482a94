"""Engine, sessions, and after-commit hooks.

SQLite runs every transaction as `BEGIN IMMEDIATE`: the write lock is taken
up front, so concurrent writers queue on the busy timeout instead of failing
with a deadlock when a reader tries to upgrade.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session, create_engine

log = logging.getLogger(__name__)

_AFTER_COMMIT = "stella_after_commit"
_DIALECT_INSERTS: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def make_engine(url: str) -> Engine:
    """An engine for `url` with the settings each backend needs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, in_memory=parsed.database in (None, "", ":memory:"))
    return create_engine(
        url,
        # Kept open: about as many as a web process's request threads use at
        # once. Overflow connections are opened and closed per checkout, and
        # opening one costs more than most transactions.
        pool_size=20,
        max_overflow=10,
        # Recover by itself after the database restarts.
        pool_pre_ping=True,
        pool_recycle=1800,
        # An unreachable server fails a request in seconds (503), not a TCP timeout.
        connect_args={"connect_timeout": 5},
    )


def _sqlite_engine(url: str, *, in_memory: bool) -> Engine:
    if in_memory:
        raise ValueError("an in-memory SQLite database cannot be shared by processes")
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=NullPool,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once `session` commits (never if it rolls back).

    Services use this to notify streams and enqueue jobs only for data that
    other processes can already read.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    callbacks = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:
            # The data is committed; a lost wake-up only delays delivery.
            log.exception("after-commit callback failed")


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def insert_ignoring_conflicts(
    session: Session,
    model: type[Any],
    rows: list[dict[str, Any]],
    *,
    conflict_columns: tuple[str, ...],
    returning: tuple[str, ...],
) -> list[tuple[Any, ...]]:
    """INSERT … ON CONFLICT DO NOTHING RETURNING, on PostgreSQL and SQLite alike.

    Returns the inserted rows' `returning` columns; rows that hit the
    conflict are skipped, which is what makes re-running an insert safe.
    """
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    insert = _DIALECT_INSERTS.get(dialect)
    if insert is None:
        raise NotImplementedError(f"no conflict-ignoring insert for {dialect}")
    table = model.__table__
    # Rows as parameters, not `.values(rows)`: the statement then compiles once
    # and is cached; SQLAlchemy batches many rows into multi-row VALUES itself.
    statement = (
        insert(table)
        .on_conflict_do_nothing(index_elements=list(conflict_columns))
        .returning(*(table.c[name] for name in returning))
    )
    return [tuple(row) for row in session.execute(statement, rows).all()]
