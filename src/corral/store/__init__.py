"""The state store: SQLAlchemy 2 over SQLite by default, PostgreSQL by URL.

The store is the only state shared between corral processes. Migrations are
Alembic scripts shipped in the package and applied on first use.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from corral.errors import StoreError
from corral.store import orchestrator_models as _orchestrator_models  # noqa: F401 - registers tables
from corral.store import security_models as _security_models  # noqa: F401 - registers tables
from corral.store.models import Base, EnvironmentRow, SandboxRow, SnapshotRow

__all__ = ["Base", "EnvironmentRow", "SandboxRow", "SnapshotRow", "Store", "open_store"]

MIGRATIONS = Path(__file__).parent / "migrations"
#: bump together with a new script in migrations/versions
HEAD_REVISION = "0004"


class Store:
    """A handle on the state database. Cheap to share; thread safe."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = _make_engine(url)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            self._migrate()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the state store {url}: {exc}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on error."""
        with self._sessions() as s, s.begin():
            yield s

    def _current_revision(self) -> str | None:
        """The store's revision; None for a store never migrated. Any other failure to
        read it (a busy database) is retried, never taken for "not migrated": that
        would run the migrations again over tables that exist."""
        for attempt in range(50):
            try:
                with self.engine.connect() as c:
                    row = c.execute(text("SELECT version_num FROM alembic_version")).first()
                    return str(row[0]) if row else None
            except ProgrammingError:  # PostgreSQL: no alembic_version relation yet
                return None
            except OperationalError as exc:
                msg = str(exc.orig)
                if "no such table" in msg:
                    return None
                if attempt == 49 or not ("locked" in msg or "busy" in msg):
                    raise
                time.sleep(0.1)
        return None  # not reached

    def _migrate(self) -> None:
        if self._current_revision() == HEAD_REVISION:
            return
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        # several processes may open a new installation at once: one migrates,
        # the others wait for it and then find the store at the head revision
        with self._migration_lock():
            if self._current_revision() == HEAD_REVISION:
                return
            engine = _migration_engine(self.url) if self.url.startswith("sqlite") \
                else self.engine
            try:
                with engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(4242424242)"))
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
            finally:
                if engine is not self.engine:
                    engine.dispose()

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if not self.url.startswith("sqlite:///"):
            yield  # PostgreSQL: the advisory lock taken inside the transaction
            return
        lock = Path(self.url.removeprefix("sqlite:///") + ".migrate-lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        event.listen(engine, "connect", _sqlite_pragmas)

    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Every SQLite connection corral opens (the store's and the migrations')."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # first: the others may wait on locks
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _migration_engine(url: str) -> Engine:
    """An engine whose transactions are SQLite's own, DDL included.

    The sqlite3 module commits each CREATE TABLE on its own; a process killed
    between two of them would leave a store with some tables and no revision,
    which no later process can migrate. Here the driver emits nothing and each
    transaction is one ``BEGIN IMMEDIATE`` ... ``COMMIT``: all the migrations
    land, or none."""
    engine = create_engine(url, poolclass=NullPool,
                           connect_args={"timeout": 30, "isolation_level": None})

    event.listen(engine, "connect", _sqlite_pragmas)

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


_stores: dict[str, Store] = {}
_lock = threading.Lock()


def open_store(url: str) -> Store:
    """The process-wide ``Store`` for ``url`` (created and migrated on first use)."""
    with _lock:
        store = _stores.get(url)
        if store is None:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            store = _stores[url] = Store(url)
        return store
